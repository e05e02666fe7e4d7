"""meterd.client against a real daemon: the batcher delivers exactly once across
a SIGKILL, rejected events go to on_error, the queue bounds hold, and the
reservation and session helpers settle what they started."""

from __future__ import annotations

import asyncio
import os
import re
import threading
from decimal import Decimal
from fractions import Fraction
from pathlib import Path

import grpc
import pytest
from conftest import async_wait_until, wait_until

from meterd.client import AsyncMeterClient, Denied, MeterClient
from meterd.v1 import admin_pb2 as apb
from meterd.v1 import meter_pb2 as pb

COST_NANO = 2_500  # one gpt-4o input token


def _used(d, customer: str, meter: str = "input_tokens") -> int:
    r = d.meter.GetBalance(pb.GetBalanceRequest(customer_id=customer))
    return int(next((u.quantity for u in r.usage if u.meter == meter), 0))


def _usd(d, customer: str) -> pb.CreditBalance:
    r = d.meter.GetBalance(pb.GetBalanceRequest(customer_id=customer))
    return next(b for b in r.balances if b.credit_type == "usd")


@pytest.fixture
def daemon(make_daemon):
    d = make_daemon().start()
    for customer in ("acme", "globex"):
        d.admin.Grant(apb.GrantRequest(customer_id=customer, credit_type="usd", amount_nano=10**15))
    return d


def test_many_threads_enqueue_and_every_event_is_counted_once_across_a_kill(daemon):
    errors: list = []
    client = MeterClient(daemon.target, batch_max=500, linger_s=0.02, retry_max_s=0.5,
                         on_error=lambda e, m: errors.append(m))
    per_thread, threads = 3000, 8
    killed = threading.Event()

    def produce(n: int) -> None:
        for i in range(per_thread):
            if i == per_thread // 3:
                assert killed.wait(60)  # the rest is enqueued while the daemon is away
            assert client.enqueue("acme", "input_tokens", 1, model="gpt-4o")

    workers = [threading.Thread(target=produce, args=(n,)) for n in range(threads)]
    for w in workers:
        w.start()
    wait_until(lambda: client.stats.acknowledged > 0, "the daemon to acknowledge a first batch")
    daemon.kill()  # batches in flight are resent with their sequences once it is back
    acknowledged_at_kill = client.stats.acknowledged
    killed.set()
    for w in workers:
        w.join()
    daemon.start()
    client.close()
    assert errors == []
    assert client.stats.acknowledged == per_thread * threads and client.stats.dropped == 0
    assert 0 < acknowledged_at_kill <= threads * (per_thread // 3)  # the kill came in the middle
    assert _used(daemon, "acme") == per_thread * threads
    assert _usd(daemon, "acme").balance_nano == 10**15 - COST_NANO * per_thread * threads


def test_a_rejected_event_goes_to_on_error_and_the_rest_of_its_batch_is_delivered(daemon):
    errors: list = []
    with MeterClient(daemon.target, linger_s=0.2, on_error=lambda e, m: errors.append((e.meter, m))) as client:
        for i in range(10):
            client.enqueue("acme", "input_tokens" if i != 4 else "no_such_meter", 1, model="gpt-4o")
        client.enqueue("acme", "input_tokens", -1, model="gpt-4o")
        assert client.flush(30)
        assert client.stats.batches == 1
    assert [meter for meter, _ in errors] == ["no_such_meter", "input_tokens"]
    assert "unknown meter" in errors[0][1] and "must not be negative" in errors[1][1]
    assert _used(daemon, "acme") == 9


def test_the_queue_is_bounded_drop_or_block(daemon):
    daemon.stop()  # nothing is acknowledged while the daemon is away
    client = MeterClient(daemon.target, queue_max=10, batch_max=5, linger_s=0.01, on_full="drop",
                         retry_max_s=0.2)
    accepted = sum(client.enqueue("acme", "input_tokens", 1, model="gpt-4o") for _ in range(100))
    assert accepted < 100 and client.stats.dropped == 100 - accepted
    daemon.start()
    client.close()
    assert _used(daemon, "acme") == accepted == client.stats.acknowledged

    blocking = MeterClient(daemon.target, queue_max=2, batch_max=1, linger_s=0)
    for _ in range(50):  # never refused: enqueue waits for room
        assert blocking.enqueue("globex", "input_tokens", 1, model="gpt-4o")
    blocking.close()
    assert _used(daemon, "globex") == 50


def test_close_gives_up_after_its_timeout_and_says_so(daemon):
    daemon.stop()
    errors: list = []
    # The batcher holds the events until close() (linger_s), and a call may wait an hour (timeout_s).
    client = MeterClient(daemon.target, retry_max_s=0.1, batch_max=100, linger_s=3600, timeout_s=3600,
                         on_error=lambda e, m: errors.append(m))
    for _ in range(4):
        client.enqueue("acme", "input_tokens", 1, model="gpt-4o")
    closing = threading.Thread(target=client.close, kwargs={"timeout_s": 1.0}, daemon=True)
    closing.start()
    # Bounded by close's timeout: without it, the call would wait for an hour.
    wait_until(lambda: not closing.is_alive(), "close(timeout_s=1.0) to return")
    assert client.stats.dropped == 4 and client.stats.acknowledged == 0
    assert len(errors) == 4 and all("not delivered before close" in m for m in errors)


def test_a_client_id_kept_across_restarts_keeps_counting(daemon):
    for _ in range(2):  # the same service restarted with a stable client_id
        with MeterClient(daemon.target, client_id="billing-worker-0") as client:
            for _ in range(3):
                client.enqueue("acme", "input_tokens", 1, model="gpt-4o")
        assert client.stats.acknowledged == 3
    assert _used(daemon, "acme") == 6
    errors: list = []
    stale = MeterClient(daemon.target, client_id="billing-worker-0", on_error=lambda e, m: errors.append(m))
    stale._sequence = 5  # a sequence below what the daemon has seen: answered as a duplicate, not counted
    stale.enqueue("acme", "input_tokens", 1, model="gpt-4o")
    stale.close()
    assert stale.stats.dropped == 1 and "was used before" in errors[0]
    assert _used(daemon, "acme") == 6


def test_batches_stay_under_the_daemons_size_limit(daemon):
    dims = {f"d{i}": "v" * 120 for i in range(15)} | {"model": "gpt-4o"}  # about 2 KB an event
    with MeterClient(daemon.target, batch_max=8000, linger_s=0.5) as client:
        for _ in range(3000):  # about 6 MB: more than one 4 MiB batch
            client.enqueue("acme", "input_tokens", 1, **dims)
    assert client.stats.acknowledged == 3000 and client.stats.batches >= 2 and client.stats.dropped == 0
    assert _used(daemon, "acme") == 3000


def test_an_event_that_cannot_be_built_is_not_left_pending(daemon):
    with MeterClient(daemon.target) as client:
        with pytest.raises(ValueError):
            client.enqueue("acme", "input_tokens", 2**64, model="gpt-4o")
        assert client.flush(10)


def test_reserve_commits_the_actual_usage_or_releases_on_an_exception(daemon):
    with MeterClient(daemon.target) as client:
        with client.reserve("acme", "output_tokens", 4000, model="gpt-4o") as r:
            assert _usd(daemon, "acme").reserved_nano == 4000 * 10_000
            r.actual = 1234
        assert r.settled.cost_nano == 1234 * 10_000
        with pytest.raises(TimeoutError):
            with client.reserve("acme", "output_tokens", 4000, model="gpt-4o"):
                raise TimeoutError("the model did not answer")
        assert _usd(daemon, "acme").reserved_nano == 0
        assert _used(daemon, "acme", "output_tokens") == 1234
        with pytest.raises(Denied):
            with client.reserve("nobody", "output_tokens", 10, model="gpt-4o"):
                pytest.fail("a denied reservation must not run its body")


def test_a_session_heartbeats_in_the_background_and_ends(daemon):
    with MeterClient(daemon.target) as client:
        with client.session("acme", "gpu_seconds", heartbeat_s=0.2, hardware="nvidia-h100") as s:
            started = s.last

            def billed_beat() -> pb.SessionResponse | None:
                last = s.last
                return last if last is not started and Decimal(last.billed_quantity) > 0 else None

            # The background thread's heartbeats bill the time so far and keep the session open.
            beat = wait_until(billed_beat, "a heartbeat to bill the session's time")
            assert beat.decision == pb.DECISION_ALLOW and not beat.closed
            assert not s.should_stop
        last = s.last
    assert last.closed and last.cost_nano >= beat.cost_nano > 0


def test_the_asyncio_client_does_the_same(daemon):
    async def main() -> None:
        errors: list = []
        async with AsyncMeterClient(daemon.target, batch_max=200, linger_s=0.01,
                                    on_error=lambda e, m: errors.append(m)) as client:
            await asyncio.gather(*(client.enqueue("globex", "input_tokens", 2, model="gpt-4o")
                                   for _ in range(1000)))
            await client.enqueue("globex", "no_such_meter", 1)
            assert await client.flush(30)
            r = await client.report("globex", "input_tokens", 5, model="gpt-4o")
            assert r.decision == pb.DECISION_ALLOW
            async with client.reserve("globex", "output_tokens", 100, model="gpt-4o") as res:
                res.actual = 60
            with pytest.raises(RuntimeError):
                async with client.reserve("globex", "output_tokens", 100, model="gpt-4o"):
                    raise RuntimeError("the work failed")
            async with client.session("globex", "gpu_seconds", heartbeat_s=0.1, hardware="cpu") as s:
                started = s.last
                await async_wait_until(lambda: s.last is not started, "a heartbeat of the session's task")
                assert s.last.decision == pb.DECISION_ALLOW and not s.should_stop
            assert s.last.closed
            assert (await client.balance("globex")).balances
        assert len(errors) == 1 and "unknown meter" in errors[0]
        assert client.stats.acknowledged == 1000

    asyncio.run(main())
    assert _used(daemon, "globex") == 2005
    assert _used(daemon, "globex", "output_tokens") == 60
    assert _usd(daemon, "globex").reserved_nano == 0


def test_a_data_plane_token_is_sent_with_every_call(make_daemon, tmp_path):
    import hashlib
    token = "client-token-0123456789abcdef"
    tokens = tmp_path / "tokens.toml"
    tokens.write_text(f'[tenants.acme]\ntoken_sha256 = "{hashlib.sha256(token.encode()).hexdigest()}"\n'
                      'customers = "acme"\n')
    d = make_daemon(extra_env={"METERD_DATA_TOKENS_FILE": str(tokens)}).start()
    d.admin.Grant(apb.GrantRequest(customer_id="acme", credit_type="usd", amount_nano=10**12))
    with MeterClient(d.target, token=token) as client:
        assert client.report("acme", "input_tokens", 1, model="gpt-4o").decision == pb.DECISION_ALLOW
        client.enqueue("acme", "input_tokens", 1, model="gpt-4o")
    with MeterClient(d.target) as anonymous, pytest.raises(grpc.RpcError) as e:
        anonymous.report("acme", "input_tokens", 1, model="gpt-4o")
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with MeterClient(d.target, token=token) as client:
        usage = client.balance("acme").usage
    assert [int(u.quantity) for u in usage if u.meter == "input_tokens"] == [2]


def test_the_readme_example_runs_as_written(make_daemon):
    import re
    import subprocess
    import sys
    from pathlib import Path
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("### The Python client", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    d = make_daemon().start()  # the built-in demo catalog: customer demo holds $10.00
    r = subprocess.run([sys.executable, "-c", code.replace("127.0.0.1:50051", d.target)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    # $0.003 + $0.000025 of input, 1,234 output tokens at $10 per million, and the H100 seconds billed
    assert int(r.stdout) < 10 * 10**9 - 3_025_000 - 12_340_000


@pytest.mark.spawns
def test_the_default_client_id_is_taken_over_by_the_next_process_and_never_shared():
    import shutil
    import subprocess
    import sys

    from meterd.client import default_client_id, release_client_id
    script = "from meterd.client import default_client_id; print(default_client_id())"

    def in_a_new_process(*prefix: str, env: dict | None = None) -> str:
        return subprocess.run([*prefix, sys.executable, "-c", script], check=True, capture_output=True, text=True,
                              env=env).stdout.strip()
    first, again = in_a_new_process(), in_a_new_process()
    assert first == again  # a restarted process gets the same id: the daemon's client table does not grow
    held = default_client_id()  # while this process holds it, another process gets another id
    try:
        assert held == first and in_a_new_process() != held
        # $TMPDIR does not move the lock files: a process with another one still sees the slot held.
        assert in_a_new_process(env={**os.environ, "TMPDIR": "/var/tmp"}) != held
        if shutil.which("unshare"):  # another mount namespace (another container): another id
            other = in_a_new_process("unshare", "--mount")
            assert other != held and other.rsplit("-", 2)[1] != held.rsplit("-", 2)[1]
    finally:
        release_client_id(held)
    assert in_a_new_process() == first


def test_a_lock_folder_another_user_could_change_gives_a_random_client_id(tmp_path, monkeypatch):
    from meterd import client as client_mod
    monkeypatch.setattr(client_mod, "SLOTS_FOLDER", str(tmp_path))
    folder = tmp_path / f"meterd-client-ids-{os.getuid()}"
    folder.mkdir()
    folder.chmod(0o777)
    a, b = client_mod.default_client_id(), client_mod.default_client_id()
    assert a != b and re.fullmatch(r"py-[0-9a-f]{32}", a), a
    assert list(folder.iterdir()) == []  # nothing was made in it


def test_a_session_closed_by_the_daemon_still_ends_with_its_final_answer(daemon):
    with MeterClient(daemon.target) as client:
        with client.session("acme", "gpu_seconds", heartbeat_s=3600, heartbeat_timeout_ms=1000,
                            hardware="nvidia-h100") as s:
            # No heartbeat: the daemon's timer closes the session at its timeout.
            wait_until(lambda: _usd(daemon, "acme").reserved_nano == 0, "the session to be closed")
        final = s.final
    # EndSession after the close gets the final answer again, not NOT_FOUND.
    assert final is not None and final.closed and final.duplicate
    assert final.session_id == s.session_id and final.cost_nano == 0


def test_the_readme_examples_of_several_quantities_run_as_written_and_charge_exactly(make_daemon):
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("### One request, several quantities", 1)[1].split("\n## ", 1)[0]
    report, reserve = re.findall(r"```python\n(.*?)```", section, re.S)
    d = make_daemon().start()  # the built-in demo catalog: customer demo holds $10.00
    with MeterClient(d.target) as meter:
        exec(report, {"meter": meter})  # noqa: S102 - the README's own example
        exec(reserve, {"meter": meter})  # noqa: S102
        usd = next(b for b in meter.balance("demo").balances if b.credit_type == "usd")
        usage = {u.meter: u.quantity for u in meter.balance("demo").usage}
        assert usd.reserved_nano == 0  # the hold was settled on leaving the block
    # gpt-4o: input $2.50, cached input $1.25, output $10.00 per 1M tokens
    call = Fraction(2_50, 100) * 1200 + Fraction(1_25, 100) * 800 + Fraction(10) * 350
    reserved = Fraction(2_50, 100) * 1200 + Fraction(10) * 350
    assert usd.balance_nano == 10 * 10**9 - (call + reserved) * 10**9 / 10**6
    assert (usage["input_tokens"], usage["cached_input_tokens"], usage["output_tokens"]) == ("2400", "800", "700")
    with MeterClient(d.target) as meter, pytest.raises(grpc.RpcError) as e:
        meter.report("demo", {"input_tokens": 1, "requests": 1}, model="gpt-4o")
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details().startswith("event.quantities[1].meter: meter 'requests' prices in credit type")


def test_the_batcher_counts_each_quantity_toward_batch_max_as_the_daemon_does(make_daemon):
    d = make_daemon(extra_env={"METERD_BATCH_EVENTS_MAX": "100"}).start()
    errors: list[str] = []
    with MeterClient(d.target, batch_max=100, linger_s=5.0, on_error=lambda e, m: errors.append(m)) as client:
        for _ in range(100):  # 200 quantities: two batches, not one the daemon refuses whole
            client.enqueue("demo", {"input_tokens": 10, "output_tokens": 5}, model="gpt-4o")
        client.flush(60)
        usage = {u.meter: u.quantity for u in client.balance("demo").usage}
    assert errors == [] and (client.stats.acknowledged, client.stats.batches) == (100, 2)
    assert (usage["input_tokens"], usage["output_tokens"]) == ("1000", "500")
