"""charstream-bench row 13 (--http-streams N): N server-sent-event streams over the HTTP port beside N
gRPC streams, on one server, all started together: the characters per second of each front end.

The two sides ask for the same seeds, so each HTTP stream's text must equal the gRPC stream of its
seed (the row fails otherwise). The HTTP clients are aiohttp's, in this process and event loop
beside the grpc.aio clients (clients.py): both sides' client costs land on the same cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from server.bench import clients
from server.bench.clients import StreamsRun, StreamStats
from server.bench.context import BenchContext
from server.bench.process import ServerProcess
from server.bench.results import Row

HTTP_ROW = 13
ROW_ID = "http_beside_grpc"
FIRST_SEED = 1
Serve = Callable[[list[str], Callable[[ServerProcess], None], list[str]], None]  # (flags, serve, row ids)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--http-streams", type=int, default=64, metavar="N",
                        help=f"row {HTTP_ROW}: N SSE streams over HTTP beside N gRPC streams on one server "
                             "(0 skips the row)")


def http_rows(args: argparse.Namespace) -> dict[str, tuple[int, str]]:
    streams = args.http_streams
    return {ROW_ID: (HTTP_ROW, f"server, {streams} HTTP SSE + {streams} gRPC streams")} if streams > 0 else {}


@dataclass(kw_only=True)
class HttpBesideGrpcResult(Row):
    streams: int  # on each side
    chars_per_stream: int
    seconds: float  # until the last stream of either side ended
    http_chars_per_s: float
    grpc_chars_per_s: float
    http_first_char_ms_p50: float
    grpc_first_char_ms_p50: float
    http_chars_per_event: float
    grpc_chars_per_message: float
    identical_texts: bool
    server_flags: list[str] = field(default_factory=list)

    def cells(self) -> dict[str, Any]:
        return {"chars/s": self.http_chars_per_s + self.grpc_chars_per_s,
                "1st ms p50": max(self.http_first_char_ms_p50, self.grpc_first_char_ms_p50)}


async def sse_stream(session: Any, url: str, prompt: str, chars: int, seed: int) -> StreamStats:
    """One one-shot Generate over HTTP as server-sent events, timed event by event (as clients.one_stream)."""
    stats, parts = StreamStats(), []  # timed from here
    body = {"prompt": prompt, "max_chars": chars, "temperature": clients.TEMPERATURE, "seed": seed, "stream": True}
    async with session.post(url + "v1/generate", json=body) as response:
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {(await response.text())[:200]}")
        async for line in response.content:  # one `data:` line per event (sse.py)
            if not line.startswith(b"data: "):
                continue
            data = json.loads(line[6:])
            if "error" in data:
                raise RuntimeError(f"stream failed: {data['error']}")
            text = data.get("text", "")
            if text:
                stats.received(text)
                parts.append(text)
    stats.text = "".join(parts)
    return stats


async def sse_streams(url: str, prompt: str, streams: int, chars: int, go: asyncio.Event) -> StreamsRun:
    import aiohttp  # the server's own HTTP library: present wherever the server is installed

    connector = aiohttp.TCPConnector(limit=0)  # one connection per stream, as a browser tab each
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None)) as session:
        await go.wait()
        started_at, started = time.monotonic(), time.perf_counter()
        results = await asyncio.gather(*(sse_stream(session, url, prompt, chars, FIRST_SEED + i)
                                         for i in range(streams)))
        return StreamsRun(time.perf_counter() - started, list(results), started_at)


async def both_sides(address: str, url: str, prompt: str, streams: int, chars: int) -> tuple[StreamsRun, StreamsRun]:
    """(HTTP, gRPC) runs of `streams` streams each, started together once the gRPC channels are connected."""
    go = asyncio.Event()

    async def gate() -> None:
        go.set()

    return await asyncio.gather(sse_streams(url, prompt, streams, chars, go),
                                clients.run_streams(address, prompt, streams, chars, FIRST_SEED, keep_text=True,
                                                    gate=gate))


def measure(bench: BenchContext, server: ServerProcess, row: int, row_id: str, title: str) -> HttpBesideGrpcResult:
    listening = server.event("listening") or {}
    url = listening.get("http")
    if not url or url == "off":
        raise RuntimeError("the server logged no HTTP port (an older server without --http-port?)")
    streams, chars = bench.args.http_streams, bench.args.chars
    http, grpc_run = clients.bounded(both_sides(server.address, url, bench.prompt, streams, chars), bench.args.timeout)
    identical = [s.text for s in http.streams] == [s.text for s in grpc_run.streams]
    seconds = max(http.seconds, grpc_run.seconds)
    result = HttpBesideGrpcResult(
        row=row, id=row_id, title=title, streams=streams, chars_per_stream=chars, seconds=seconds,
        http_chars_per_s=http.total_chars / http.seconds, grpc_chars_per_s=grpc_run.total_chars / grpc_run.seconds,
        http_first_char_ms_p50=http.first_char_ms(50), grpc_first_char_ms_p50=grpc_run.first_char_ms(50),
        http_chars_per_event=http.total_chars / max(1, http.messages),
        grpc_chars_per_message=grpc_run.total_chars / max(1, grpc_run.messages),
        identical_texts=identical, server_flags=server.flags)
    result.note = (f"HTTP {result.http_chars_per_s:,.0f} chars/s (1st {result.http_first_char_ms_p50:.0f} ms p50, "
                   f"{result.http_chars_per_event:.1f} chars/event), gRPC {result.grpc_chars_per_s:,.0f} chars/s "
                   f"(1st {result.grpc_first_char_ms_p50:.0f} ms, {result.grpc_chars_per_message:.1f} chars/msg)")
    if not identical:
        result.status = "failed"
        result.note += "; TEXTS DIFFER between HTTP and gRPC streams of the same seeds"
    return result


def run_http_row(bench: BenchContext, flags: list[str], serve: Serve) -> None:
    """Row 13 on a server of its own (`flags` plus an HTTP port), when --http-streams asks for it."""
    streams = bench.args.http_streams
    if streams <= 0:
        return
    room = ["--max-sessions", str(2 * streams)] if 2 * streams > 1024 else []  # the server's default: 1024

    def on_server(server: ServerProcess) -> None:
        bench.info = bench.info or clients.model_info(server.address, bench.args.timeout)
        clients.bounded(clients.run_streams(server.address, bench.prompt, streams, 8, 10**6), bench.args.timeout)
        bench.attempt(ROW_ID, lambda row, row_id, title: measure(bench, server, row, row_id, title))

    serve([*flags, "--http-port", "0", *room], on_server, [ROW_ID])
