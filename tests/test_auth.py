"""API keys, sessions owned by keys, per-key limits: the keys file parser, and a real server
on a loopback port called as two different keys."""

from __future__ import annotations

import re
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos.charstream.v1 import generator_pb2 as pb
from protos.charstream.v1 import generator_pb2_grpc as pb_grpc
from server.api.auth import ApiKeysError, parse_api_keys
from server.background import BackgroundServer
from server.config import ServerConfig
from tests.conftest import TINY_TEXT

REPO_ROOT = Path(__file__).resolve().parents[1]
SECRET_A = "alpha-secret-0123456789"
SECRET_B = "bravo-secret-9876543210"
KEYS_FILE = f"# two clients\n\nalice:{SECRET_A}\n  bob : {SECRET_B}  \n"


def test_keys_file_comments_blanks_and_spaces() -> None:
    keys = parse_api_keys(KEYS_FILE, "keys.txt")
    assert keys.names == ["alice", "bob"]
    assert keys.identify([("authorization", f"Bearer {SECRET_A}")]) == "alice"
    assert keys.identify([("authorization", f"bearer {SECRET_B}")]) == "bob"
    assert keys.identify([("authorization", f"Bearer {SECRET_A}x")]) is None
    assert keys.identify([("authorization", SECRET_A)]) is None  # no scheme
    assert keys.identify([("authorization", f"Basic {SECRET_A}")]) is None
    assert keys.identify([("x-other", f"Bearer {SECRET_A}")]) is None
    assert keys.identify(None) is None


@pytest.mark.parametrize("text, line, problem", [
    ("alice:" + SECRET_A + "\nno-colon-here\n", 2, "expected NAME:SECRET"),
    ("# c\n\nbad name:" + SECRET_A + "\n", 3, "NAME must be"),
    ("alice:short\n", 1, "at least 16 characters"),
    ("alice:" + SECRET_A + "\nalice:" + SECRET_B + "\n", 2, "used twice"),
    ("alice:" + SECRET_A + "\nbob:" + SECRET_A + "\n", 2, "secret is used twice"),
    ("alice:has a space in it here\n", 1, "without spaces"),
])
def test_malformed_keys_files_name_the_line_and_never_the_secret(text: str, line: int, problem: str) -> None:
    with pytest.raises(ApiKeysError) as failure:
        parse_api_keys(text, "keys.txt")
    message = str(failure.value)
    assert message.startswith(f"keys.txt, line {line}: ")
    assert problem in message
    assert SECRET_A not in message and SECRET_B not in message and "short" not in message


def test_an_empty_keys_file_is_refused() -> None:
    with pytest.raises(ApiKeysError, match="holds no keys"):
        parse_api_keys("# nothing\n\n", "keys.txt")


def test_server_with_a_malformed_keys_file_exits_2_naming_the_line(tiny_model_dir: Path, tmp_path: Path) -> None:
    keys = tmp_path / "keys.txt"
    keys.write_text(f"alice:{SECRET_A}\nbob\n")
    result = subprocess.run([sys.executable, "-m", "server", "--model", str(tiny_model_dir), "--port", "0",
                             "--device", "cpu", "--api-keys", str(keys)],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert f"{keys}, line 2: expected NAME:SECRET" in result.stderr
    assert SECRET_A not in result.stderr + result.stdout


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackgroundServer]:
    keys = tmp_path_factory.mktemp("keys") / "keys.txt"
    keys.write_text(KEYS_FILE)
    config = ServerConfig(model=str(tiny_model_dir), port=0, device="cpu", max_sessions=16, metrics_port=0,
                          api_keys=str(keys), max_sessions_per_key=3, max_streams_per_key=2)
    with BackgroundServer(config) as running:
        yield running


def as_key(secret: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {secret}"),)


def calls(stub: pb_grpc.GeneratorStub, session_id: str) -> dict[str, object]:
    """Every Generator RPC that names a session, ready to call with metadata."""
    return {
        "GetSession": lambda md: stub.GetSession(pb.GetSessionRequest(session_id=session_id), metadata=md),
        "Generate": lambda md: list(stub.Generate(pb.GenerateRequest(session_id=session_id, max_chars=3),
                                                  metadata=md)),
        "ResetSession": lambda md: stub.ResetSession(pb.ResetSessionRequest(session_id=session_id), metadata=md),
        "ForkSession": lambda md: stub.ForkSession(pb.ForkSessionRequest(session_id=session_id), metadata=md),
        "ExportSession": lambda md: stub.ExportSession(pb.ExportSessionRequest(session_id=session_id), metadata=md),
        "DeleteSession": lambda md: stub.DeleteSession(pb.DeleteSessionRequest(session_id=session_id), metadata=md),
    }


def status_of(call, metadata) -> tuple[grpc.StatusCode, str]:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as failure:
        call(metadata)
    return failure.value.code(), failure.value.details()


def test_every_generator_rpc_needs_a_valid_key(channel: grpc.Channel) -> None:
    stub = pb_grpc.GeneratorStub(channel)
    unary = {
        "GetModelInfo": lambda md: stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=md),
        "CreateSession": lambda md: stub.CreateSession(pb.CreateSessionRequest(prompt="To be"), metadata=md),
        "ListSessions": lambda md: stub.ListSessions(pb.ListSessionsRequest(), metadata=md),
        "ImportSession": lambda md: stub.ImportSession(pb.ImportSessionRequest(state=b"x"), metadata=md),
        "Converse": lambda md: list(stub.Converse(iter([pb.ConverseRequest(text="To be", max_chars=2)]),
                                                  metadata=md)),
        **calls(stub, "a" * 32),
    }
    for name, call in unary.items():
        for metadata in (None, as_key("wrong-secret-0123456789"), (("authorization", SECRET_A),)):
            code, details = status_of(call, metadata)
            assert code == grpc.StatusCode.UNAUTHENTICATED, name
            assert "API key" in details and SECRET_A not in details
    info = stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=as_key(SECRET_A))
    assert "".join(info.vocabulary) == "".join(sorted(set(TINY_TEXT)))  # the tiny model's characters


def test_health_answers_without_a_key(channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    reply = health.Check(health_pb2.HealthCheckRequest(service="charstream.v1.Generator"))
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_sessions_of_another_key_do_not_exist_for_it(channel: grpc.Channel) -> None:
    stub = pb_grpc.GeneratorStub(channel)
    mine = stub.CreateSession(pb.CreateSessionRequest(prompt="To be", seed=1), metadata=as_key(SECRET_A)).session_id
    for name, call in calls(stub, mine).items():
        code, details = status_of(call, as_key(SECRET_B))
        unknown_code, unknown_details = status_of(calls(stub, "b" * 32)[name], as_key(SECRET_B))
        assert code == unknown_code == grpc.StatusCode.NOT_FOUND, name
        assert details == unknown_details.replace("b" * 32, mine), name  # nothing tells them apart
    listed_b = stub.ListSessions(pb.ListSessionsRequest(), metadata=as_key(SECRET_B)).sessions
    listed_a = stub.ListSessions(pb.ListSessionsRequest(), metadata=as_key(SECRET_A)).sessions
    assert mine not in [s.session_id for s in listed_b]
    assert mine in [s.session_id for s in listed_a]
    # The owner still has it, untouched by the other key's attempts.
    info = stub.GetSession(pb.GetSessionRequest(session_id=mine), metadata=as_key(SECRET_A)).session
    assert info.consumed_chars == len("To be")
    stub.DeleteSession(pb.DeleteSessionRequest(session_id=mine), metadata=as_key(SECRET_A))


def test_a_busy_session_of_another_key_is_not_found_not_busy(channel: grpc.Channel) -> None:
    stub = pb_grpc.GeneratorStub(channel)
    mine = stub.CreateSession(pb.CreateSessionRequest(prompt="To be"), metadata=as_key(SECRET_A)).session_id
    stream = stub.Generate(pb.GenerateRequest(session_id=mine, max_chars=10_000), metadata=as_key(SECRET_A))
    next(stream)
    try:
        code, _ = status_of(calls(stub, mine)["Generate"], as_key(SECRET_B))
        assert code == grpc.StatusCode.NOT_FOUND
    finally:
        stream.cancel()


def test_per_key_session_limit_evicts_the_keys_own_oldest_idle_session(channel: grpc.Channel) -> None:
    stub = pb_grpc.GeneratorStub(channel)
    for session in stub.ListSessions(pb.ListSessionsRequest(), metadata=as_key(SECRET_B)).sessions:
        stub.DeleteSession(pb.DeleteSessionRequest(session_id=session.session_id), metadata=as_key(SECRET_B))
    other = stub.CreateSession(pb.CreateSessionRequest(prompt="To be"), metadata=as_key(SECRET_A)).session_id
    made = [stub.CreateSession(pb.CreateSessionRequest(prompt="To be"), metadata=as_key(SECRET_B)).session_id
            for _ in range(4)]
    listed = {s.session_id for s in stub.ListSessions(pb.ListSessionsRequest(), metadata=as_key(SECRET_B)).sessions}
    assert listed == set(made[1:])  # the limit is 3: the oldest went
    code, details = status_of(calls(stub, made[0])["GetSession"], as_key(SECRET_B))
    assert code == grpc.StatusCode.NOT_FOUND and "--max-sessions-per-key" in details
    # The other key's session was not touched.
    kept = stub.GetSession(pb.GetSessionRequest(session_id=other), metadata=as_key(SECRET_A)).session
    assert kept.session_id == other
    # Two streams (its limit) running: a third is refused, naming the limit.
    streams = [stub.Generate(pb.GenerateRequest(session_id=s, max_chars=10_000), metadata=as_key(SECRET_B))
               for s in made[1:3]]
    try:
        for stream in streams:
            next(stream)
        code, details = status_of(calls(stub, made[3])["Generate"], as_key(SECRET_B))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-streams-per-key" in details
    finally:
        for stream in streams:
            stream.cancel()


def test_metrics_and_errors_never_show_secrets_or_session_ids(server: BackgroundServer, channel: grpc.Channel) -> None:
    stub = pb_grpc.GeneratorStub(channel)
    session_id = stub.CreateSession(pb.CreateSessionRequest(prompt="To be"), metadata=as_key(SECRET_A)).session_id
    status_of(lambda md: stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=md), as_key(SECRET_B + "x"))
    assert server.running is not None and server.running.metrics_endpoint is not None
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.running.metrics_endpoint.port}/metrics",
                                  timeout=5).read().decode()
    assert re.search(r'charstream_rpc_errors_total\{code="UNAUTHENTICATED",method="GetModelInfo"\} [1-9]', text)
    for secret in (SECRET_A, SECRET_B, session_id):
        assert secret not in text
