"""charstream-bench rows 4-7 (client side): concurrent one-shot Generate streams over grpc.aio.

Streams are spread over one channel per STREAMS_PER_CHANNEL streams, each
channel with its own connection. Times are what the clients see: time to the
first message with text, and the gaps between messages with text.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass, field

import grpc
import numpy as np

from protos.charstream.v1 import generator_pb2 as pb
from protos.charstream.v1 import generator_pb2_grpc as pb_grpc

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


@dataclass
class StreamsRun:
    seconds: float
    streams: list[StreamStats]

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


async def one_stream(stub: pb_grpc.GeneratorStub, prompt: str, chars: int, seed: int) -> StreamStats:
    """One one-shot Generate call (no session_id), timed message by message."""
    request = pb.GenerateRequest(prompt=prompt, max_chars=chars, temperature=TEMPERATURE, seed=seed)
    stats = StreamStats()
    started = time.perf_counter()
    last = started
    async for response in stub.Generate(request):
        now = time.perf_counter()
        if not response.text:
            continue
        if stats.messages == 0:
            stats.first_char_s = now - started
        else:
            stats.gaps_s.append(now - last)
        stats.chars += len(response.text)
        stats.messages += 1
        last = now
    return stats


async def run_streams(address: str, prompt: str, streams: int, chars: int, first_seed: int) -> StreamsRun:
    """`streams` concurrent one-shot streams, seeds first_seed, first_seed + 1, ..."""
    channels = [grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
                for _ in range(max(1, math.ceil(streams / STREAMS_PER_CHANNEL)))]
    try:
        stubs = [pb_grpc.GeneratorStub(channel) for channel in channels]
        await asyncio.gather(*(channel.channel_ready() for channel in channels))
        started = time.perf_counter()
        results = await asyncio.gather(*(one_stream(stubs[i % len(stubs)], prompt, chars, first_seed + i)
                                         for i in range(streams)))
        return StreamsRun(time.perf_counter() - started, list(results))
    finally:
        await asyncio.gather(*(channel.close() for channel in channels))


def bounded(coroutine, timeout: float):  # type: ignore[no-untyped-def]
    """Run a coroutine to completion in a fresh event loop, at most `timeout` seconds."""
    return asyncio.run(asyncio.wait_for(coroutine, timeout))


def model_info(address: str, timeout: float) -> pb.GetModelInfoResponse:
    with grpc.insecure_channel(address) as channel:
        return pb_grpc.GeneratorStub(channel).GetModelInfo(pb.GetModelInfoRequest(), timeout=timeout)
