"""A bare gRPC echo server on the same stack as meterd (grpc.aio, raw bytes,
one process): the ceiling for unary calls.

    python -m benchmarks.echo 127.0.0.1:50099 [--handoff]

With ``--handoff`` each call waits, before it answers, until another thread
has seen it and woken the event loop, the way a durable answer waits for
meterd's LMDB writer, but with no storage and no other work: the ceiling for
any unary call that is answered only after another thread has finished with it.
"""

from __future__ import annotations

import asyncio
import collections
import signal
import sys
import threading

import grpc


async def _echo(data: bytes, ctx: grpc.aio.ServicerContext) -> bytes:
    return data


class Handoff:
    """A thread that takes the waiting calls in groups and wakes the loop once per group."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: collections.deque[asyncio.Future] = collections.deque()
        self.cond = threading.Condition()
        threading.Thread(target=self._run, daemon=True).start()

    async def __call__(self, data: bytes, ctx: grpc.aio.ServicerContext) -> bytes:
        fut = self.loop.create_future()
        with self.cond:
            self.queue.append(fut)
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
            self.loop.call_soon_threadsafe(_resolve, group)


def _resolve(group: list[asyncio.Future]) -> None:
    for fut in group:
        if not fut.done():
            fut.set_result(None)


async def serve(address: str, handoff: bool = False) -> None:
    loop = asyncio.get_running_loop()
    handler = Handoff(loop) if handoff else _echo
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
    asyncio.run(serve(sys.argv[1], "--handoff" in sys.argv[2:]))
