"""Streaming promises under load, over a real server on a loopback port: a stream that ends early
(cancel, deadline) leaves its session at exactly what was handed over, and the client can read
where that is; coalesced messages lose, repeat and reorder nothing; a client that stops reading
holds at most its lookahead and does not stop the others.

Each test runs on one server process (--frontends 1, in this process) and on two front-ends
(--frontends 2, a subprocess); calls go over several connections, which the kernel spreads over
the front-ends, and a session is read and continued over another connection than its stream's."""

from __future__ import annotations

import asyncio
import random
import re
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import grpc
import pytest

from protos.charstream.v1 import generator_pb2 as pb
from protos.charstream.v1 import generator_pb2_grpc as pb_grpc
from server.background import BackgroundServer
from server.config import ServerConfig
from server.engine.sampling import SamplingSettings
from tests.frontends_server import FrontendsServer
from tests.plain_loop import onnx_loop

LOOKAHEAD = 16
PROMPT = "To be, or not"
CHARS = 300


CONNECTIONS = 4
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]  # a channel of its own: a connection of its own


@dataclass(frozen=True)
class Served:
    address: str
    metrics_url: str


@pytest.fixture(scope="module", params=[1, 2], ids=["frontends1", "frontends2"])
def server(request: pytest.FixtureRequest, tiny_model_dir: Path, serving_device: str) -> Iterator[Served]:
    if request.param == 1:
        config = ServerConfig(model=str(tiny_model_dir), port=0, device=serving_device, max_sessions=128,
                              lookahead=LOOKAHEAD, metrics_port=0, max_chars=20_000)
        with BackgroundServer(config) as running:
            yield Served(running.address, f"http://127.0.0.1:{running.running.metrics_endpoint.port}/metrics")
        return
    with FrontendsServer(tiny_model_dir, request.param, "--max-sessions", "128", "--lookahead", str(LOOKAHEAD),
                         "--max-chars", "20000", device=serving_device) as frontends:
        yield Served(frontends.address, frontends.metrics_url)


def stubs_of(channels: list[grpc.aio.Channel]) -> list[pb_grpc.GeneratorStub]:
    return [pb_grpc.GeneratorStub(channel) for channel in channels]


def open_channels(address: str) -> list[grpc.aio.Channel]:
    return [grpc.aio.insecure_channel(address, options=OWN_CONNECTION) for _ in range(CONNECTIONS)]


async def create(stub: pb_grpc.GeneratorStub, seed: int, temperature: float) -> str:
    reply = await stub.CreateSession(pb.CreateSessionRequest(prompt=PROMPT, seed=seed, temperature=temperature))
    return reply.session_id


async def read_all(stub: pb_grpc.GeneratorStub, session_id: str, n: int) -> str:
    if n == 0:  # the cut came after the last character was handed over
        return ""
    return "".join([r.text async for r in stub.Generate(pb.GenerateRequest(session_id=session_id, max_chars=n))])


async def references(stub: pb_grpc.GeneratorStub, seeds: list[int], temperature: float, chars: int = CHARS) -> list[str]:
    """Each seed's uninterrupted text."""
    sessions = [await create(stub, seed, temperature) for seed in seeds]
    return await asyncio.gather(*(read_all(stub, s, chars) for s in sessions))


async def cut_and_continue(stub: pb_grpc.GeneratorStub, other: pb_grpc.GeneratorStub, seed: int,
                           temperature: float, cut: int) -> dict:
    """Read until `cut` characters arrived, cancel, read the session and continue to CHARS in all
    over `other` (another connection)."""
    session_id = await create(stub, seed, temperature)
    call = stub.Generate(pb.GenerateRequest(session_id=session_id, max_chars=CHARS))
    received = ""
    async for response in call:
        received += response.text
        if len(received) >= cut:
            call.cancel()
            break
    info = (await other.GetSession(pb.GetSessionRequest(session_id=session_id))).session
    while info.busy:  # the server notices the cancel within a step
        await asyncio.sleep(0.01)
        info = (await other.GetSession(pb.GetSessionRequest(session_id=session_id))).session
    rest = await read_all(other, session_id, CHARS - (info.consumed_chars - len(PROMPT)))
    return {"received": received, "consumed": info.consumed_chars, "recent": info.recent_text, "rest": rest}


@pytest.mark.parametrize("temperature", [0.0, 0.9], ids=["greedy", "seeded"])
def test_cancelled_streams_continue_exactly_under_concurrent_load(server: Served, temperature: float) -> None:
    rng = random.Random(int(temperature * 10))
    seeds = list(range(40, 72))
    cuts = [rng.randrange(1, CHARS - 1) for _ in seeds]

    async def scenario() -> tuple[list[str], list[dict]]:
        channels = open_channels(server.address)
        stubs = stubs_of(channels)
        try:
            expected = await references(stubs[0], seeds, temperature)
            runs = await asyncio.wait_for(asyncio.gather(*(  # a lost wake-up fails, not hangs
                cut_and_continue(stubs[i % CONNECTIONS], stubs[(i + 1) % CONNECTIONS], s, temperature, c)
                for i, (s, c) in enumerate(zip(seeds, cuts))
            )), 120)
            return expected, runs
        finally:
            await asyncio.gather(*(channel.close() for channel in channels))

    expected, runs = asyncio.run(scenario())
    for reference, run in zip(expected, runs):
        kept = run["consumed"] - len(PROMPT)  # what the session holds: at least what the client got
        assert reference.startswith(run["received"])
        assert len(run["received"]) <= kept <= CHARS
        assert run["recent"] == (PROMPT + reference[:kept])[-256:]  # shows the client what it missed
        assert reference[:kept] + run["rest"] == reference


def test_a_deadline_behaves_like_a_cancel(server: Served) -> None:
    # Long enough that the deadline passes mid-stream even where a lone stream runs in stretches.
    chars = 20 * CHARS

    async def scenario() -> tuple[str, str, pb.SessionInfo, str]:
        async with grpc.aio.insecure_channel(server.address, options=OWN_CONNECTION) as channel, \
                grpc.aio.insecure_channel(server.address, options=OWN_CONNECTION) as other_channel:
            stub, other = pb_grpc.GeneratorStub(channel), pb_grpc.GeneratorStub(other_channel)
            (reference,) = await references(stub, [5], 1.0, chars)
            session_id = await create(stub, 5, 1.0)
            call = stub.Generate(pb.GenerateRequest(session_id=session_id, max_chars=chars), timeout=0.02)
            received = ""
            with pytest.raises(grpc.aio.AioRpcError) as failure:
                async for response in call:
                    received += response.text
                    await asyncio.sleep(0.002)  # a slow reader: the deadline passes mid-stream
            assert failure.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            info = (await other.GetSession(pb.GetSessionRequest(session_id=session_id))).session
            while info.busy:
                await asyncio.sleep(0.01)
                info = (await other.GetSession(pb.GetSessionRequest(session_id=session_id))).session
            rest = await read_all(other, session_id, chars - (info.consumed_chars - len(PROMPT)))
            return reference, received, info, rest

    reference, received, info, rest = asyncio.run(scenario())
    kept = info.consumed_chars - len(PROMPT)
    assert reference.startswith(received) and len(received) <= kept < chars
    assert info.recent_text == (PROMPT + reference[:kept])[-256:]
    assert reference[:kept] + rest == reference


def test_coalesced_messages_lose_repeat_and_reorder_nothing(server: Served) -> None:
    """Slow readers get several characters per message; the text is still exactly the reference."""
    seeds = list(range(100, 132))

    async def slow_read(stub: pb_grpc.GeneratorStub, seed: int) -> list[str]:
        session_id = await create(stub, seed, 1.0)
        messages = []
        async for response in stub.Generate(pb.GenerateRequest(session_id=session_id, max_chars=CHARS)):
            messages.append(response.text)
            await asyncio.sleep(0.005)
        return messages

    async def scenario() -> tuple[list[str], list[list[str]]]:
        channels = open_channels(server.address)
        stubs = stubs_of(channels)
        try:
            expected = await references(stubs[0], seeds, 1.0)
            return expected, await asyncio.gather(*(slow_read(stubs[i % CONNECTIONS], seed)
                                                    for i, seed in enumerate(seeds)))
        finally:
            await asyncio.gather(*(channel.close() for channel in channels))

    expected, streams = asyncio.run(scenario())
    assert ["".join(messages) for messages in streams] == expected
    sizes = [len(text) for messages in streams for text in messages if text]
    assert max(sizes) > 1, "a slow reader should get coalesced messages"
    assert max(sizes) <= LOOKAHEAD + 1  # never more than the lookahead could have made ready


def metric(server: Served, name: str) -> float:
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    found = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    assert found, name
    return float(found.group(1))


def test_a_client_that_stops_reading_holds_at_most_its_lookahead(server: Served,
                                                                 tiny_model_dir: Path) -> None:
    # A tiny flow-control window: the server's writes block as soon as the client stops reading.
    options = [("grpc.http2.lookahead_bytes", 512), ("grpc.http2.bdp_probe", 0)]
    with grpc.insecure_channel(server.address, options=options) as channel:
        stub = pb_grpc.GeneratorStub(channel)
        create_reply = stub.CreateSession(pb.CreateSessionRequest(prompt=PROMPT, seed=9))
        reference_id = stub.CreateSession(pb.CreateSessionRequest(prompt=PROMPT, seed=9)).session_id
        stalled = stub.Generate(pb.GenerateRequest(session_id=create_reply.session_id, max_chars=5000))
        first = next(stalled).text
        time.sleep(1.0)  # not reading
        held = stub.GetSession(pb.GetSessionRequest(session_id=create_reply.session_id)).session
        assert held.busy and held.consumed_chars - len(PROMPT) < 5000, "the stalled stream must be held back"
        assert 0 < metric(server, "charstream_most_undelivered_chars") <= LOOKAHEAD
        # Another stream runs to the end meanwhile.
        other = stub.CreateSession(pb.CreateSessionRequest(prompt="Or", seed=1)).session_id
        text = "".join(r.text for r in stub.Generate(pb.GenerateRequest(session_id=other, max_chars=2000), timeout=60))
        assert text == onnx_loop(tiny_model_dir, "Or", 2000, SamplingSettings(), seed=1)
        rest = "".join(r.text for r in stalled)  # reading again: nothing lost
        reference = "".join(
            r.text for r in stub.Generate(pb.GenerateRequest(session_id=reference_id, max_chars=5000), timeout=60)
        )
        assert first + rest == reference
