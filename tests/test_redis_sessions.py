"""Replicas sharing sessions through a real redis-server: server processes on loopback ports,
each test's Redis private and stopped at the end.

Every check compares text with what one uninterrupted session produces: a session moved
between replicas, forked, exported, or recovered after a replica was killed continues
exactly."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos.charstream.v1 import generator_pb2 as pb
from protos.charstream.v1 import generator_pb2_grpc as pb_grpc
from server.clients.client import CharstreamClient, targets_to_uri
from server.engine.sampling import SamplingSettings
from tests.plain_loop import GREEDY, onnx_loop, wire
from tests.redis_server import RedisServer, redis_server_binary

REPO_ROOT = Path(__file__).resolve().parents[1]
PROMPT = "To be, or not"
LEASE_SECONDS = 1.0
WRITE_BACK = 16


class Replica:
    """charstream-serve in its own process, sharing `store`."""

    def __init__(self, model_dir: Path, store: str, log: Path, **flags: object):
        args = [sys.executable, "-m", "server", "--model", str(model_dir), "--port", "0", "--device", "cpu",
                "--session-store", store, "--lease-seconds", str(LEASE_SECONDS),
                "--write-back-chars", str(WRITE_BACK), "--shutdown-grace", "0.5"]
        for name, value in flags.items():
            args += ["--" + name.replace("_", "-"), str(value)]
        self._log = open(log, "w")
        self.process = subprocess.Popen(args, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=self._log, text=True)
        line = self.process.stdout.readline()  # type: ignore[union-attr]
        match = re.match(r"listening on (\S+)", line)
        if match is None:
            self.stop()
            raise RuntimeError(f"replica did not start: {line!r}; log: {log.read_text()[-2000:]}")
        self.address = match.group(1)
        self.channel = grpc.insecure_channel(self.address)
        self.stub = pb_grpc.GeneratorStub(self.channel)

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()
        if hasattr(self, "channel"):
            self.channel.close()
        self._log.close()


@pytest.fixture()
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    redis_server_binary()
    with RedisServer(tmp_path / "redis") as server:
        yield server


@pytest.fixture()
def replicas(tiny_model_dir: Path, redis: RedisServer, tmp_path: Path) -> Iterator[list[Replica]]:
    started: list[Replica] = []

    def start(**flags: object) -> Replica:
        replica = Replica(tiny_model_dir, redis.url, tmp_path / f"replica{len(started)}.log", **flags)
        started.append(replica)
        return replica

    start(), start()
    yield started
    for replica in started:
        replica.stop()


def generate(stub: pb_grpc.GeneratorStub, session_id: str, max_chars: int) -> str:
    return "".join(r.text for r in stub.Generate(pb.GenerateRequest(session_id=session_id, max_chars=max_chars)))


def create(stub: pb_grpc.GeneratorStub, temperature: float, seed: int = 11) -> str:
    request = pb.CreateSessionRequest(prompt=PROMPT, seed=seed, temperature=temperature)
    return stub.CreateSession(request).session_id


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_a_session_continues_exactly_on_any_replica(replicas: list[Replica], tiny_model_dir: Path,
                                                    temperature: float) -> None:
    a, b = replicas
    whole = generate(a.stub, create(a.stub, temperature), 240)
    session_id = create(a.stub, temperature)
    parts = [generate(a.stub, session_id, 70), generate(b.stub, session_id, 70)]
    # A replica started after the session was made serves it too.
    later = Replica(tiny_model_dir, a_store(a), a_log(a, "later"))
    try:
        parts.append(generate(later.stub, session_id, 50))
    finally:
        later.stop()
    parts.append(generate(a.stub, session_id, 50))
    assert "".join(parts) == whole
    info = b.stub.GetSession(pb.GetSessionRequest(session_id=session_id)).session
    assert info.consumed_chars == len(PROMPT) + 240
    assert info.recent_text == (PROMPT + whole)[-256:]


def a_store(replica: Replica) -> str:
    args = replica.process.args  # type: ignore[attr-defined]
    return args[args.index("--session-store") + 1]


def a_log(replica: Replica, name: str) -> Path:
    return Path(replica._log.name).with_name(f"{name}.log")


def test_fork_export_and_import_across_replicas(replicas: list[Replica]) -> None:
    a, b = replicas
    whole = generate(a.stub, create(a.stub, 0.8), 150)
    session_id = create(a.stub, 0.8)
    head = generate(a.stub, session_id, 50)
    fork = a.stub.ForkSession(pb.ForkSessionRequest(session_id=session_id)).session_id
    state = a.stub.ExportSession(pb.ExportSessionRequest(session_id=session_id)).state
    imported = b.stub.ImportSession(pb.ImportSessionRequest(state=state)).session_id
    assert head + generate(b.stub, fork, 100) == whole
    assert head + generate(b.stub, imported, 100) == whole
    assert head + generate(a.stub, session_id, 100) == whole


def test_concurrent_calls_on_one_session_are_refused_on_any_replica(replicas: list[Replica],
                                                                   tiny_model_dir: Path) -> None:
    a, b = replicas
    session_id = create(a.stub, 0.9)
    stream = a.stub.Generate(pb.GenerateRequest(session_id=session_id, max_chars=10_000))
    next(stream)
    try:
        for stub in (b.stub, a.stub):
            with pytest.raises(grpc.RpcError) as refused:
                generate(stub, session_id, 10)
            assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "busy" in refused.value.details()
        assert b.stub.GetSession(pb.GetSessionRequest(session_id=session_id)).session.busy
    finally:
        stream.cancel()
    deadline = time.monotonic() + 10
    while b.stub.GetSession(pb.GetSessionRequest(session_id=session_id)).session.busy:
        assert time.monotonic() < deadline, "the cancelled call never released the session"
        time.sleep(0.05)
    kept = b.stub.GetSession(pb.GetSessionRequest(session_id=session_id)).session.consumed_chars - len(PROMPT)
    whole = onnx_loop(tiny_model_dir, PROMPT, kept + 10, SamplingSettings(temperature=wire(0.9)), seed=11)
    assert generate(b.stub, session_id, 10) == whole[kept:]  # continues from what the cancelled call handed over


def test_a_killed_replica_loses_less_than_the_write_back_interval(replicas: list[Replica]) -> None:
    a, b = replicas
    whole = generate(b.stub, create(b.stub, 0.9), 3000)
    session_id = create(a.stub, 0.9)
    received = ""
    for message in a.stub.Generate(pb.GenerateRequest(session_id=session_id, max_chars=3000)):
        received += message.text
        if len(received) >= 400:
            a.kill()
            break
    assert received == whole[: len(received)]
    killed_at = time.monotonic()
    while True:  # busy until A's lease lapses
        try:
            continued = generate(b.stub, session_id, 1)
            break
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.FAILED_PRECONDITION, error.details()
            assert time.monotonic() - killed_at < LEASE_SECONDS + 5, "the dead replica's lease never lapsed"
            time.sleep(0.05)
    info = b.stub.GetSession(pb.GetSessionRequest(session_id=session_id)).session
    kept = info.consumed_chars - len(PROMPT) - 1  # B generated one character already
    assert len(received) - WRITE_BACK < kept <= len(whole)
    assert info.recent_text == (PROMPT + whole[: kept + 1])[-256:]
    assert continued == whole[kept]
    assert generate(b.stub, session_id, 100) == whole[kept + 1: kept + 101]


def test_round_robin_client_streams_one_session_across_replicas(replicas: list[Replica]) -> None:
    a, b = replicas
    whole = generate(a.stub, create(a.stub, 0.7), 200)
    with CharstreamClient(targets_to_uri([a.address, b.address]), lb_policy="round_robin") as client:
        session = client.create_session(prompt=PROMPT, seed=11, temperature=0.7)
        text = "".join("".join(session.generate(max_chars=20)) for _ in range(10))
    assert text == whole


def test_sessions_expire_after_the_ttl(tiny_model_dir: Path, redis: RedisServer, tmp_path: Path) -> None:
    replica = Replica(tiny_model_dir, redis.url, tmp_path / "ttl.log", session_ttl=0.5)
    try:
        session_id = create(replica.stub, 0.0)
        assert generate(replica.stub, session_id, 5) == onnx_loop(tiny_model_dir, PROMPT, 5, GREEDY)
        time.sleep(1.0)
        with pytest.raises(grpc.RpcError) as gone:
            replica.stub.GetSession(pb.GetSessionRequest(session_id=session_id))
        assert gone.value.code() == grpc.StatusCode.NOT_FOUND
        assert "expired" in gone.value.details()
    finally:
        replica.stop()


def health(replica: Replica) -> int:
    stub = health_pb2_grpc.HealthStub(replica.channel)
    return stub.Check(health_pb2.HealthCheckRequest(service="charstream.v1.Generator"), timeout=5).status


def wait_for_health(replica: Replica, status: int, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while health(replica) != status:
        assert time.monotonic() < deadline, f"health never became {status}"
        time.sleep(0.1)


def test_redis_down_means_unavailable_and_not_serving_until_it_is_back(replicas: list[Replica],
                                                                      redis: RedisServer, tiny_model_dir: Path) -> None:
    a, _ = replicas
    session_id = create(a.stub, 0.0)
    redis.stop()
    with pytest.raises(grpc.RpcError) as down:
        generate(a.stub, session_id, 5)
    assert down.value.code() == grpc.StatusCode.UNAVAILABLE
    assert redis.url.removeprefix("redis://").split("/")[0] in down.value.details()
    wait_for_health(a, health_pb2.HealthCheckResponse.NOT_SERVING)
    # One-shot calls need no store and still work.
    one_shot = "".join(r.text for r in a.stub.Generate(pb.GenerateRequest(prompt=PROMPT, max_chars=5, seed=4)))
    assert one_shot == onnx_loop(tiny_model_dir, PROMPT, 5, SamplingSettings(), seed=4)
    redis.start()
    wait_for_health(a, health_pb2.HealthCheckResponse.SERVING)
    # This Redis keeps nothing on disk: the old session is gone, new ones work.
    with pytest.raises(grpc.RpcError) as gone:
        a.stub.GetSession(pb.GetSessionRequest(session_id=session_id))
    assert gone.value.code() == grpc.StatusCode.NOT_FOUND
    assert generate(a.stub, create(a.stub, 0.0), 5) == onnx_loop(tiny_model_dir, PROMPT, 5, GREEDY)


def test_shared_sessions_belong_to_their_key_on_every_replica(tiny_model_dir: Path, redis: RedisServer,
                                                              tmp_path: Path) -> None:
    alice, bob = ("authorization", "Bearer alice-secret-0123456789"), ("authorization", "Bearer bob-secret-0123456789xy")
    keys = tmp_path / "keys.txt"
    keys.write_text("alice:alice-secret-0123456789\nbob:bob-secret-0123456789xy\n")
    a = Replica(tiny_model_dir, redis.url, tmp_path / "ka.log", api_keys=keys)
    b = Replica(tiny_model_dir, redis.url, tmp_path / "kb.log", api_keys=keys)
    try:
        request = pb.CreateSessionRequest(prompt=PROMPT, seed=3, temperature=0.9)
        session_id = a.stub.CreateSession(request, metadata=(alice,)).session_id
        stream = a.stub.Generate(pb.GenerateRequest(session_id=session_id, max_chars=10_000), metadata=(alice,))
        next(stream)  # busy on A: to bob it must still not exist (not "busy")
        try:
            for call in (lambda: b.stub.GetSession(pb.GetSessionRequest(session_id=session_id), metadata=(bob,)),
                         lambda: list(b.stub.Generate(pb.GenerateRequest(session_id=session_id, max_chars=3),
                                                      metadata=(bob,))),
                         lambda: b.stub.DeleteSession(pb.DeleteSessionRequest(session_id=session_id),
                                                      metadata=(bob,))):
                with pytest.raises(grpc.RpcError) as hidden:
                    call()
                assert hidden.value.code() == grpc.StatusCode.NOT_FOUND
            listed = b.stub.ListSessions(pb.ListSessionsRequest(), metadata=(bob,)).sessions
            assert session_id not in [s.session_id for s in listed]
        finally:
            stream.cancel()
        deadline = time.monotonic() + 10
        while b.stub.GetSession(pb.GetSessionRequest(session_id=session_id), metadata=(alice,)).session.busy:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        info = b.stub.GetSession(pb.GetSessionRequest(session_id=session_id), metadata=(alice,)).session
        kept = info.consumed_chars - len(PROMPT)
        whole = onnx_loop(tiny_model_dir, PROMPT, kept + 5, SamplingSettings(temperature=wire(0.9)), seed=3)
        assert "".join(r.text for r in b.stub.Generate(
            pb.GenerateRequest(session_id=session_id, max_chars=5), metadata=(alice,))) == whole[kept:]
    finally:
        a.stop()
        b.stop()
