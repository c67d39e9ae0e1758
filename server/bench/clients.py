"""charstream-bench rows 4-7 (client side): concurrent one-shot Generate streams through the asyncio client.

Streams are spread over one client (one grpc.aio channel) per STREAMS_PER_CHANNEL
streams, each channel with its own connection. Times are what the clients see:
time to the first message with text, and the gaps between messages with text
(the client's stream yields one chunk per message with text).
Rows 5, 6 and 12 may split one row's streams over several processes, each
running run_streams on its share (spread.py).

    run = bounded(run_streams("127.0.0.1:50051", "To be", streams=8, chars=200, first_seed=1), timeout=60)
    print(run.total_chars / run.seconds, run.first_char_ms(50), run.gap_ms(99))
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from protos.charstream.v1 import generator_pb2 as pb
from server.clients.aio_client import AsyncCharstreamClient

PROMPT_CHARS = 16
STREAMS_PER_CHANNEL = 32
TEMPERATURE = 1.0
# Separate channels share one connection unless each has its own subchannel pool.
CHANNEL_OPTIONS = [("grpc.use_local_subchannel_pool", 1)]


@dataclass
class StreamStats:
    chars: int = 0
    messages: int = 0  # messages with text
    first_char_s: float = math.nan
    gaps_s: list[float] = field(default_factory=list)
    text: str | None = None  # the characters received, only when asked for (keep_text): tests compare them
    _started: float = field(default_factory=time.perf_counter, repr=False)  # when the call was made
    _last: float = math.nan  # when the last message came

    def received(self, text: str) -> None:
        """A message with `text` came now: its gap since the last (or the time to the first character)."""
        now = time.perf_counter()
        if self.messages == 0:
            self.first_char_s = now - self._started
        else:
            self.gaps_s.append(now - self._last)
        self.chars += len(text)
        self.messages += 1
        self._last = now


@dataclass
class StreamsRun:
    seconds: float
    streams: list[StreamStats]
    # time.monotonic() when the streams started: system-wide on Linux, so runs of several client processes
    # can be laid on one time line (spread.merge_runs)
    started_at: float = math.nan

    @property
    def total_chars(self) -> int:
        return sum(s.chars for s in self.streams)

    @property
    def messages(self) -> int:
        return sum(s.messages for s in self.streams)

    def first_char_ms(self, q: float) -> float:
        return percentile_ms([s.first_char_s for s in self.streams], q)

    def gap_ms(self, q: float) -> float:
        return percentile_ms([g for s in self.streams for g in s.gaps_s], q)


def percentile_ms(values: list[float], q: float) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.percentile(finite, q) * 1000) if finite else math.nan


async def one_stream(client: AsyncCharstreamClient, prompt: str, chars: int, seed: int,
                     keep_text: bool = False) -> StreamStats:
    """One one-shot Generate call (no session_id), timed message by message."""
    stats = StreamStats()  # timed from here
    parts: list[str] = []
    async for text in client.generate(prompt, chars, temperature=TEMPERATURE, seed=seed):
        if keep_text:
            parts.append(text)
        stats.received(text)
    if keep_text:
        stats.text = "".join(parts)
    return stats


async def run_streams(address: str, prompt: str, streams: int, chars: int, first_seed: int, *,
                      keep_text: bool = False, gate: Callable[[], Awaitable[None]] | None = None) -> StreamsRun:
    """`streams` concurrent one-shot streams, seeds first_seed, first_seed + 1, ...; `gate`, when given, is
    awaited once the channels are connected and returns when the streams are to start (bench_spread)."""
    clients = [AsyncCharstreamClient(address, timeout=None, options=CHANNEL_OPTIONS)
               for _ in range(max(1, math.ceil(streams / STREAMS_PER_CHANNEL)))]
    try:
        # Connected before the clock starts: the rows time streams, not connection set-up.
        await asyncio.gather(*(client.channel.channel_ready() for client in clients))
        if gate is not None:
            await gate()
        started_at, started = time.monotonic(), time.perf_counter()
        results = await asyncio.gather(*(one_stream(clients[i % len(clients)], prompt, chars, first_seed + i,
                                                    keep_text) for i in range(streams)))
        return StreamsRun(time.perf_counter() - started, list(results), started_at)
    finally:
        await asyncio.gather(*(client.close() for client in clients))


def bench_prompt(vocabulary: Sequence[str]) -> str:
    """The PROMPT_CHARS-character prompt of every server row: every 7th character of the vocabulary, cycled."""
    vocab = list(vocabulary)
    return "".join(vocab[(i * 7) % len(vocab)] for i in range(PROMPT_CHARS))


def bounded(coroutine, timeout: float):  # type: ignore[no-untyped-def]
    """Run a coroutine to completion in a fresh event loop, at most `timeout` seconds."""
    return asyncio.run(asyncio.wait_for(coroutine, timeout))


async def _model_info(address: str, timeout: float) -> pb.GetModelInfoResponse:
    async with AsyncCharstreamClient(address, timeout=timeout) as client:
        return await client.model_info()


def model_info(address: str, timeout: float) -> pb.GetModelInfoResponse:
    """The server's GetModelInfo reply, asked in an event loop of its own (callers are synchronous)."""
    return asyncio.run(_model_info(address, timeout))
