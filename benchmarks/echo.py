"""A bare gRPC echo server on the same stack as meterd (grpc.aio, raw bytes,
one process): the ceiling for unary calls.

    python -m benchmarks.echo 127.0.0.1:50099 [--handoff [--durable DIR]]

With ``--handoff`` each call waits, before it answers, until another thread
has seen it and woken the event loop, the way a durable answer waits for
meterd's LMDB writer, but with no other work: the ceiling for any unary call
that is answered only after another thread has finished with it. With
``--durable`` that thread also writes each call's request to LMDB, one
transaction with fsync per group of calls, as meterd's group commit does: the
ceiling of a durable answer on this stack.
"""

from __future__ import annotations

import asyncio
import collections
import signal
import sys
import threading

import grpc
import lmdb


async def _echo(data: bytes, ctx: grpc.aio.ServicerContext) -> bytes:
    return data


class Handoff:
    """A thread that takes the waiting calls in groups and wakes the loop once per group."""

    def __init__(self, loop: asyncio.AbstractEventLoop, durable: str = "") -> None:
        self.loop = loop
        self.env = lmdb.open(durable, map_size=4 << 30, sync=True, metasync=True) if durable else None
        self.written = 0
        self.queue: collections.deque[tuple[asyncio.Future, bytes]] = collections.deque()
        self.cond = threading.Condition()
        threading.Thread(target=self._run, daemon=True).start()

    async def call(self, data: bytes, ctx: grpc.aio.ServicerContext) -> bytes:
        fut = self.loop.create_future()
        with self.cond:
            self.queue.append((fut, data))
            self.cond.notify()
        await fut
        return data

    def _run(self) -> None:
        while True:
            with self.cond:
                while not self.queue:
                    self.cond.wait()
                group = list(self.queue)
                self.queue.clear()
            if self.env is not None:
                with self.env.begin(write=True) as txn:
                    for _, data in group:
                        self.written += 1
                        txn.put(self.written.to_bytes(8, "big"), data)
            self.loop.call_soon_threadsafe(_resolve, group)


def _resolve(group: list[tuple[asyncio.Future, bytes]]) -> None:
    for fut, _ in group:
        if not fut.done():
            fut.set_result(None)


async def serve(address: str, handoff: bool = False, durable: str = "") -> None:
    loop = asyncio.get_running_loop()
    handler = Handoff(loop, durable).call if handoff else _echo  # grpc.aio needs a coroutine function
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 << 20),
                                      ("grpc.max_send_message_length", 64 << 20), ("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("Echo", {
        "Call": grpc.unary_unary_rpc_method_handler(handler, request_deserializer=None, response_serializer=None)})])
    server.add_insecure_port(address)
    await server.start()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1)


if __name__ == "__main__":
    args = sys.argv[2:]
    durable_dir = args[args.index("--durable") + 1] if "--durable" in args else ""
    asyncio.run(serve(sys.argv[1], "--handoff" in args, durable_dir))
