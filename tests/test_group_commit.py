"""The LMDB writer's group commit, on a real LMDB and a real event loop."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

from conftest import wait_until

from meterd.store import Store, Unit, from_u64, u64


def _store(path: str, window_us: int) -> Store:
    return Store(path, 1 << 24, True, window_us, 4096)


def test_concurrent_callers_share_commits_and_all_are_durable(tmp_path):
    async def main() -> Store:
        store = _store(str(tmp_path), 200)
        loop = asyncio.get_running_loop()
        store.start(loop, lambda e: None)

        async def put(i: int) -> None:
            fut = loop.create_future()
            store.submit(Unit([("meta", b"k%04d" % i, u64(i))], fut))
            await fut

        await asyncio.gather(*(put(i) for i in range(500)))
        store.stop()
        return store

    store = asyncio.run(main())
    assert store.committed_ops == 500
    assert store.commits < 500  # callers that came while a commit ran joined the next one
    assert [from_u64(store.get("meta", b"k%04d" % i) or b"") for i in range(500)] == list(range(500))
    store.close()


class Loop(asyncio.SelectorEventLoop):
    """An event loop that notes when another thread (the writer) posts it a callback."""

    def __init__(self) -> None:
        super().__init__()
        self.posted = threading.Event()
        self.posted_at = 0.0

    def call_soon_threadsafe(self, *args: Any, **kwargs: Any) -> asyncio.Handle:
        handle = super().call_soon_threadsafe(*args, **kwargs)
        self.posted_at = time.perf_counter()
        self.posted.set()
        return handle


def test_the_writer_waits_for_company_only_while_the_loop_is_behind(tmp_path):
    window_s = 0.5

    async def main() -> list[int]:
        store = _store(str(tmp_path), int(window_s * 1e6))
        loop = asyncio.get_running_loop()
        store.start(loop, lambda e: None)
        waits = []

        async def put(i: int, behind: bool = False) -> None:
            fut = loop.create_future()
            loop.posted.clear()
            store.submit(Unit([("meta", b"k%d" % i, b"v")], fut))
            if behind:  # the loop is busy elsewhere when the commit's answer is due:
                assert loop.posted.wait(30), "the writer did not answer the commit"
                # ...it gets to the answer more than a window after the writer posted it
                wait_until(lambda: time.perf_counter() - loop.posted_at > window_s, "the loop to fall behind")
            await fut
            waits.append(store.window_waits)

        await put(0)               # an idle loop: committed at once
        await put(1, behind=True)  # this answer runs more than a window late...
        await put(2)               # ...so the next commit waits one window for company
        await put(3)               # that answer ran on time: at once again
        store.stop()
        store.close()
        return waits

    with asyncio.Runner(loop_factory=Loop) as runner:
        assert runner.run(main()) == [0, 0, 1, 1]
