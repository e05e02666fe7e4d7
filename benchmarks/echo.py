"""A bare gRPC echo server on the same stack as meterd (grpc.aio, raw bytes,
one process): the ceiling for unary calls.

    python -m benchmarks.echo 127.0.0.1:50099
"""

from __future__ import annotations

import asyncio
import signal
import sys

import grpc


async def _echo(data: bytes, ctx: grpc.aio.ServicerContext) -> bytes:
    return data


async def serve(address: str) -> None:
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 << 20),
                                      ("grpc.max_send_message_length", 64 << 20), ("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("Echo", {
        "Call": grpc.unary_unary_rpc_method_handler(_echo, request_deserializer=None, response_serializer=None)})])
    server.add_insecure_port(address)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1)


if __name__ == "__main__":
    asyncio.run(serve(sys.argv[1]))
