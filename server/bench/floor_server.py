"""charstream-bench row 12's floor: a gRPC server with no engine, what the transport alone delivers.

Row 12 serves a model whose step costs microseconds, so what is left is the
server's pipeline and the clients, all on the same machine. This server is the
part of that no server of this kind can avoid: the same Generator service over
grpc.aio, answering Generate with text it already has (no session, no model,
no engine process), in messages of a fixed size. Its first message carries one
character (as the real server's first message never waits), then every
message `--message-chars` until `max_chars`, the last one with the finish
(LENGTH) and the counts. Every other call is UNIMPLEMENTED. The text cycles
through the request's prompt, so it is on the model's vocabulary.

    python -m server.bench.floor_server --message-chars 32
    # prints "listening on 127.0.0.1:PORT" on stdout once it serves; SIGTERM stops it

Run against the same clients with the real server's mean message size, it
says how much of row 12 the transport itself takes (ceiling.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from collections.abc import Sequence

import grpc

from protos.charstream.v1 import generator_pb2 as pb
from protos.charstream.v1 import generator_pb2_grpc as pb_grpc

FILLER = "a"  # the text of a request without a prompt


def message_sizes(max_chars: int, message_chars: int) -> list[int]:
    """Characters of each message for `max_chars`: one first, then `message_chars` each, the rest last."""
    if max_chars <= 0:
        return []
    sizes = [1]
    left = max_chars - 1
    while left > 0:
        sizes.append(min(message_chars, left))
        left -= sizes[-1]
    return sizes


class FloorGenerator(pb_grpc.GeneratorServicer):
    """Generate with no engine behind it: the prompt's characters, cycled, in fixed-size messages."""

    def __init__(self, message_chars: int):
        self.message_chars = message_chars

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> None:
        source = request.prompt or FILLER
        sizes = message_sizes(request.max_chars, self.message_chars)
        # The whole text at once (a few hundred characters), sliced per message.
        text = (source * (request.max_chars // len(source) + 1))[:request.max_chars]
        at = 0
        for k, size in enumerate(sizes):
            message = pb.GenerateResponse(text=text[at:at + size])
            at += size
            if k == len(sizes) - 1:
                message.finish_reason = pb.FINISH_REASON_LENGTH
                message.generated_chars = request.max_chars
                message.prompt_chars = len(request.prompt)
            await context.write(message)


async def serve(host: str, port: int, message_chars: int) -> None:
    server = grpc.aio.server()
    pb_grpc.add_GeneratorServicer_to_server(FloorGenerator(message_chars), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    address = f"{host}:{bound}"
    # The bench's process runner reads the stdout line for the address and waits for the log event.
    print(json.dumps({"event": "listening", "address": address, "message_chars": message_chars}),
          file=sys.stderr, flush=True)
    print(f"listening on {address}", flush=True)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    await stopping.wait()
    await server.stop(grace=None)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m server.bench.floor_server", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="port; 0 picks a free one (default: 0)")
    parser.add_argument("--message-chars", type=int, default=32, metavar="N",
                        help="characters of every message after the first (default: 32)")
    args = parser.parse_args(argv)
    if args.message_chars < 1 or not 0 <= args.port <= 65535:
        parser.error("--message-chars must be >= 1 and --port in 0-65535")
    asyncio.run(serve(args.host, args.port, args.message_chars))
    return 0


if __name__ == "__main__":
    sys.exit(main())
