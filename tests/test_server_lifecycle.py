"""Server-level behaviour: expiry and eviction, capacity, health, reflection, metrics,
the command-line client, SIGTERM shutdown of `python -m server`, and no torch. A failing model
step: tests/test_server_step_failure.py."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import grpc
import pytest
from google.protobuf import descriptor_pool
from google.protobuf.message_factory import GetMessageClass
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from protos.charstream.v1 import generator_pb2 as pb
from protos.charstream.v1 import generator_pb2_grpc as pb_grpc
from server.background import BackgroundServer
from server.clients.client import CharstreamClient
from server.config import ServerConfig
from server.engine.sampling import SamplingSettings
from tests.plain_loop import GREEDY, onnx_loop

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def small_server(tiny_model_dir: Path) -> Iterator[BackgroundServer]:
    """Two sessions at most, a short TTL, metrics on a free port."""
    config = ServerConfig(model=str(tiny_model_dir), port=0, device="cpu", max_sessions=2, session_ttl=0.5,
                          metrics_port=0)
    with BackgroundServer(config) as running:
        yield running


@pytest.fixture(scope="module")
def channel(small_server: BackgroundServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(small_server.address) as channel:
        yield channel


def _error(call, request) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as error:
        call(request)
    return error.value


class Clock:
    """A clock that moves only when told to, from the real monotonic time it starts at."""

    def __init__(self) -> None:
        self.now = time.monotonic()

    def __call__(self) -> float:
        return self.now


def test_idle_sessions_expire_with_a_message_saying_so(small_server: BackgroundServer, channel: grpc.Channel,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    assert small_server.running is not None
    clock = Clock()
    monkeypatch.setattr(small_server.running.service.store.store, "_clock", clock)  # the server's SessionStore
    stub = pb_grpc.GeneratorStub(channel)
    session_id = stub.CreateSession(pb.CreateSessionRequest(prompt="To")).session_id
    clock.now += 0.4  # within the 0.5 s TTL: still there
    assert stub.GetSession(pb.GetSessionRequest(session_id=session_id)).session.session_id == session_id
    clock.now += 0.2
    error = _error(stub.GetSession, pb.GetSessionRequest(session_id=session_id))
    assert error.code() == grpc.StatusCode.NOT_FOUND and "expired after 0.5 s" in error.details()


def test_least_recently_used_session_is_evicted_with_a_message_saying_so(channel: grpc.Channel) -> None:
    stub = pb_grpc.GeneratorStub(channel)
    first, second, third = (stub.CreateSession(pb.CreateSessionRequest(prompt="To")).session_id for _ in range(3))
    error = _error(stub.GetSession, pb.GetSessionRequest(session_id=first))
    assert error.code() == grpc.StatusCode.NOT_FOUND and "evicted" in error.details()
    assert stub.GetSession(pb.GetSessionRequest(session_id=third)).session.session_id == third
    for session_id in (second, third):
        stub.DeleteSession(pb.DeleteSessionRequest(session_id=session_id))


def test_when_every_session_is_busy_new_ones_are_refused(channel: grpc.Channel) -> None:
    stub = pb_grpc.GeneratorStub(channel)
    calls = [stub.Generate(pb.GenerateRequest(prompt="To", max_chars=10_000)) for _ in range(2)]
    for call in calls:
        next(iter(call))  # both one-shot sessions are generating
    error = _error(stub.CreateSession, pb.CreateSessionRequest())
    for call in calls:
        call.cancel()
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-sessions" in error.details()


def test_health_reports_serving(channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "charstream.v1.Generator"):
        response = health.Check(health_pb2.HealthCheckRequest(service=service))
        assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_the_service_and_a_generic_client_can_call_it(channel: grpc.Channel) -> None:
    """What grpcurl does: discover the API by reflection, then call it with no stubs."""
    database = ProtoReflectionDescriptorDatabase(channel)
    assert "charstream.v1.Generator" in database.get_services()
    assert "grpc.health.v1.Health" in database.get_services()
    pool = descriptor_pool.DescriptorPool(database)
    method = pool.FindServiceByName("charstream.v1.Generator").FindMethodByName("GetModelInfo")
    request_class = GetMessageClass(method.input_type)
    response_class = GetMessageClass(method.output_type)
    call = channel.unary_unary(
        "/charstream.v1.Generator/GetModelInfo",
        request_serializer=request_class.SerializeToString,
        response_deserializer=response_class.FromString,
    )
    info = call(request_class())
    assert info.vocab_size == 28 and info.execution_provider == "CPUExecutionProvider"


def test_metrics_endpoint_exposes_the_counters(small_server: BackgroundServer, channel: grpc.Channel,
                                               tiny_model_dir: Path) -> None:
    stub = pb_grpc.GeneratorStub(channel)
    assert small_server.running is not None and small_server.running.metrics_endpoint is not None
    port = small_server.running.metrics_endpoint.port

    def scrape() -> str:
        return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()

    def value(text: str, pattern: str, missing: float | None = None) -> float:
        match = re.search(rf"^{pattern} (\S+)$", text, re.MULTILINE)
        if match is None and missing is not None:
            return missing  # a labelled counter has no sample before its first increment
        assert match, f"{pattern} missing from /metrics"
        return float(match.group(1))

    deadline = time.monotonic() + 10
    while value(before := scrape(), "charstream_active_streams") != 0:  # earlier tests' streams have ended
        assert time.monotonic() < deadline, "streams of earlier tests never ended"
        time.sleep(0.05)
    text = "".join(r.text for r in stub.Generate(pb.GenerateRequest(prompt="To", max_chars=25, seed=6)))
    assert text == onnx_loop(tiny_model_dir, "To", 25, SamplingSettings(), seed=6)
    _error(lambda r: list(stub.Generate(r)), pb.GenerateRequest(prompt="To", max_chars=0))
    after = scrape()

    def grown(pattern: str) -> float:
        return value(after, pattern) - value(before, pattern, missing=0.0)

    assert grown("charstream_generated_chars_total") == 25
    assert grown(r'charstream_rpc_errors_total\{code="INVALID_ARGUMENT",method="Generate"\}') == 1
    # Every character is consumed by a step or inside a stretch (a lone stream's run of them in one call).
    stretched = grown(r'charstream_stretch_chars_total\{result="kept"\}')
    assert stretched > 0 and grown("charstream_step_seconds_count") + stretched >= 25
    assert grown("charstream_batch_size_count") == grown("charstream_step_seconds_count")
    assert grown(r'charstream_generations_finished_total\{reason="length"\}') == 1
    assert value(after, "charstream_active_streams") == 0
    sessions = len(small_server.running.service.store)  # type: ignore[arg-type]
    assert value(after, "charstream_active_sessions") == sessions


def test_generate_cli_prints_the_text_as_it_arrives(small_server: BackgroundServer) -> None:
    with CharstreamClient(small_server.address) as client:
        expected = client.generate("To be", 60, temperature=0.8, seed=1).text()
    result = subprocess.run(
        [sys.executable, "-m", "server.clients.generate_cli", "--target", small_server.address, "--prompt", "To be",
         "--max-chars", "60", "--temperature", "0.8", "--seed", "1"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected + "\n"
    assert "[finish: length, 60 chars]" in result.stderr
    bad = subprocess.run(
        [sys.executable, "-m", "server.clients.generate_cli", "--target", small_server.address, "--prompt", "Zebra"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
    )
    assert bad.returncode == 1 and "INVALID_ARGUMENT" in bad.stderr and "'Z'" in bad.stderr


def test_client_library_sessions_and_conversation(small_server: BackgroundServer, tiny_model_dir: Path) -> None:
    whole = onnx_loop(tiny_model_dir, "Or", 60, SamplingSettings(), seed=1)  # the session's uninterrupted text
    stop = whole[29]  # the first call's last character
    end = whole.index(stop, 30) + 1  # seed 1: it comes again within the next 30, where the second call stops
    with CharstreamClient(small_server.address) as client:
        session = client.create_session("Or", seed=1)
        first = session.generate(max_chars=30).text()
        second_stream = session.generate(max_chars=30, stop=[first[-1]])
        second = second_stream.text()
        assert first == whole[:30]
        assert second == whole[30:end] and end < 60
        assert (second_stream.finish_reason, second_stream.matched_stop) == ("stop", stop)
        assert session.info().consumed_chars == 2 + 30 + len(second)
        session.delete()
        conversation = client.conversation()
        reply = "".join(conversation.say("To be", max_chars=12, temperature=0.0))
        assert reply == onnx_loop(tiny_model_dir, "To be", 12, GREEDY) and conversation.last_finish_reason == "length"
        # The next turn continues the same state (the prompt so far, the reply, the new text), sampling from seed 9.
        assert "".join(conversation.say(",", max_chars=5, temperature=1.0, seed=9)) == onnx_loop(
            tiny_model_dir, "To be" + reply + ",", 5, SamplingSettings(temperature=1.0), seed=9)
        conversation.close()


def test_sigterm_ends_active_streams_with_a_finish_reason_and_exits_0(tiny_model_dir: Path) -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "server", "--model", str(tiny_model_dir), "--port", "0", "--device", "cpu",
         "--max-chars", "1000000", "--shutdown-grace", "5"],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    try:
        line = process.stdout.readline()  # type: ignore[union-attr]
        match = re.fullmatch(r"listening on (\S+)\n", line)
        assert match, f"unexpected first line {line!r}; stderr: {process.stderr.read() if process.poll() is not None else ''}"  # type: ignore[union-attr]
        with grpc.insecure_channel(match.group(1)) as channel:
            stub = pb_grpc.GeneratorStub(channel)
            stream = stub.Generate(pb.GenerateRequest(prompt="To", max_chars=1_000_000), timeout=30)
            responses = iter(stream)
            next(responses)
            process.send_signal(signal.SIGTERM)
            rest = list(responses)
        assert rest and rest[-1].finish_reason == pb.FINISH_REASON_SHUTDOWN
        assert process.wait(timeout=20) == 0
        log = process.stderr.read()  # type: ignore[union-attr]
        assert "event=signal_received signal=SIGTERM" in log and "event=shutdown_complete" in log
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_the_server_never_imports_torch() -> None:
    code = (
        "import sys, server.main, server.app, server.clients.client, server.clients.generate_cli, server.bench.bench\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_start_up_failures_exit_2_with_a_reason(tmp_path: Path, small_server: BackgroundServer) -> None:
    def serve(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "server", "--device", "cpu", *args], cwd=REPO_ROOT,
                              capture_output=True, text=True, timeout=60)

    missing = serve("--model", str(tmp_path / "missing"), "--port", "0")
    assert missing.returncode == 2 and "model directory not found" in missing.stderr
    taken = serve("--model", small_server.config.model, "--port", str(small_server.port))
    assert taken.returncode == 2 and f"cannot listen on 127.0.0.1:{small_server.port}" in taken.stderr


def test_shutdown_ends_a_conversation_waiting_for_its_next_turn_cleanly(tiny_model_dir: Path) -> None:
    config = ServerConfig(model=str(tiny_model_dir), port=0, device="cpu", max_sessions=2)
    turns: queue.Queue[pb.ConverseRequest | None] = queue.Queue()
    turns.put(pb.ConverseRequest(text="To", max_chars=3))
    with BackgroundServer(config) as server, grpc.insecure_channel(server.address) as channel:
        responses = pb_grpc.GeneratorStub(channel).Converse(iter(turns.get, None), timeout=30)
        while not next(responses).finish_reason:  # the first turn's reply, to its end
            pass
        stopping = threading.Thread(target=server.stop, kwargs={"grace": 5.0})
        stopping.start()  # the conversation is between turns: nothing to finish, nothing failed
        try:
            assert list(responses) == []
            assert responses.code() == grpc.StatusCode.OK
        finally:
            turns.put(None)
            stopping.join(timeout=30)
