"""The engine in a process of its own (--engine-process, the default) against the engine thread:
the same texts, snapshots that cross the pipe, larger messages under load (--coalesce-streams),
and a child that dies: its streams fail with INTERNAL, later calls are refused, the server lives."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos.charstream.v1 import generator_pb2 as pb
from protos.charstream.v1 import generator_pb2_grpc as pb_grpc
from server.background import BackgroundServer
from server.config import ServerConfig
from server.engine.generation import StreamEvent
from server.engine.runtime.process import EngineProcess
from server.engine.runtime.stream import GenerationStream
from server.engine.sampling import SamplingSettings
from tests.plain_loop import onnx_loop

PROMPT = "To be, or not"


def config(model_dir: Path, **overrides: object) -> ServerConfig:
    return ServerConfig(model=str(model_dir), port=0, device="cpu", max_sessions=64,
                        **overrides)  # type: ignore[arg-type]


@pytest.mark.parametrize("engine_process", [True, False], ids=["process", "thread"])
def test_both_engines_stream_the_plain_loop_text_and_fork_exactly(tiny_model_dir: Path, engine_process: bool) -> None:
    settings = SamplingSettings(temperature=0.8, top_k=10)
    with BackgroundServer(config(tiny_model_dir, engine_process=engine_process)) as server, \
            grpc.insecure_channel(server.address) as channel:
        assert isinstance(server.running.engine, EngineProcess) is engine_process  # type: ignore[union-attr]
        stub = pb_grpc.GeneratorStub(channel)
        session_id = stub.CreateSession(pb.CreateSessionRequest(prompt=PROMPT, seed=3, temperature=0.8,
                                                                top_k=10)).session_id
        first = "".join(r.text for r in stub.Generate(pb.GenerateRequest(session_id=session_id, max_chars=40)))
        fork = stub.ForkSession(pb.ForkSessionRequest(session_id=session_id)).session.session_id  # a snapshot
        rest = "".join(r.text for r in stub.Generate(pb.GenerateRequest(session_id=session_id, max_chars=60)))
        forked = "".join(r.text for r in stub.Generate(pb.GenerateRequest(session_id=fork, max_chars=60)))
    reference = onnx_loop(tiny_model_dir, PROMPT, 100, settings, seed=3)
    assert first + rest == reference
    assert first + forked == reference


def test_messages_grow_with_the_number_of_streams(tiny_model_dir: Path) -> None:
    """--coalesce-streams 2 with 8 streams: after the first, messages wait for 4 characters."""
    streams, chars = 8, 200

    async def scenario(address: str) -> list[list[str]]:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = pb_grpc.GeneratorStub(channel)

            async def read(seed: int) -> list[str]:
                call = stub.Generate(pb.GenerateRequest(prompt=PROMPT, max_chars=chars, seed=seed, temperature=1.0))
                return [r.text async for r in call if r.text]

            return await asyncio.gather(*(read(seed) for seed in range(streams)))

    with BackgroundServer(config(tiny_model_dir, coalesce_streams=2, lookahead=16)) as server:
        messages = asyncio.run(scenario(server.address))
    for seed, stream in enumerate(messages):
        assert "".join(stream) == onnx_loop(tiny_model_dir, PROMPT, chars, SamplingSettings(), seed=seed)
    total = sum(len(stream) for stream in messages)
    # Each stream's first message goes at once; while all 8 run the rest carry >= 4 characters.
    assert total <= streams * chars / 2, f"{total} messages for {streams * chars} characters"


def test_a_chunk_waits_for_its_minimum_unless_the_stream_ends() -> None:
    async def scenario() -> tuple[bool, str, str, bool]:
        stream = GenerationStream(1, lambda *_: None, lambda *_: None)
        for char in "abc":
            stream.receive(StreamEvent(text=char))
        waiting = asyncio.ensure_future(stream.next_chunk(min_chars=4))
        await asyncio.sleep(0.01)
        still_waiting = not waiting.done()
        stream.receive(StreamEvent(text="d"))
        four = (await waiting).text
        stream.receive(StreamEvent(text="e"))
        stream.receive(StreamEvent(text="f", finish="length"))
        last = await stream.next_chunk(min_chars=4)
        return still_waiting, four, last.text, last.end is not None

    assert asyncio.run(scenario()) == (True, "abcd", "ef", True)


@pytest.fixture()
def process_server(tiny_model_dir: Path) -> Iterator[BackgroundServer]:
    with BackgroundServer(config(tiny_model_dir, max_chars=100_000)) as running:
        yield running


def test_a_dead_engine_process_fails_its_streams_and_refuses_new_ones(process_server: BackgroundServer) -> None:
    engine = process_server.running.engine  # type: ignore[union-attr]
    assert isinstance(engine, EngineProcess)
    with grpc.insecure_channel(process_server.address) as channel:
        stub = pb_grpc.GeneratorStub(channel)
        session_id = stub.CreateSession(pb.CreateSessionRequest(prompt=PROMPT, seed=1)).session_id
        call = stub.Generate(pb.GenerateRequest(session_id=session_id, max_chars=100_000), timeout=60)
        next(call)  # running
        os.kill(engine._process.pid, signal.SIGKILL)  # type: ignore[arg-type]
        with pytest.raises(grpc.RpcError) as running_stream:
            for _ in call:
                pass
        assert running_stream.value.code() == grpc.StatusCode.INTERNAL
        assert "server log" in running_stream.value.details()  # internal details stay in the log
        deadline = time.monotonic() + 10
        while stub.GetSession(pb.GetSessionRequest(session_id=session_id)).session.busy:
            assert time.monotonic() < deadline, "the failed stream did not release its session"
            time.sleep(0.01)
        with pytest.raises(grpc.RpcError) as later:
            list(stub.Generate(pb.GenerateRequest(prompt="Or", max_chars=5), timeout=10))
        assert later.value.code() == grpc.StatusCode.INTERNAL
        info = stub.GetModelInfo(pb.GetModelInfoRequest())  # the server itself still answers
        assert info.vocab_size == len(engine.info.spec.vocab)
        health = health_pb2_grpc.HealthStub(channel)
        answer = health.Check(health_pb2.HealthCheckRequest(service="charstream.v1.Generator"))
        assert answer.status == health_pb2.HealthCheckResponse.NOT_SERVING
