"""Sessions as data over a real server on a loopback port: fork, export and import continue
exactly; bad records get clear statuses; the prefix-state cache changes no text."""

from __future__ import annotations

import dataclasses
import re
import urllib.request
from pathlib import Path
from typing import Iterator

import grpc
import numpy as np
import pytest

from protos.charstream.v1 import generator_pb2 as pb
from protos.charstream.v1 import generator_pb2_grpc as pb_grpc
from server.background import BackgroundServer
from server.config import ServerConfig
from server.engine.prefix_cache import entry_nbytes
from server.sessions.record import decode_record, encode_record

PROMPT = "To be, or not"


def config(model_dir: Path, **overrides: object) -> ServerConfig:
    values: dict = dict(model=str(model_dir), port=0, device="cpu", max_sessions=32, metrics_port=0)
    values.update(overrides)
    return ServerConfig(**values)


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, serving_device: str) -> Iterator[BackgroundServer]:
    with BackgroundServer(config(tiny_model_dir, device=serving_device)) as running:
        yield running


@pytest.fixture()
def stub(server: BackgroundServer) -> Iterator[pb_grpc.GeneratorStub]:
    with grpc.insecure_channel(server.address) as channel:
        yield pb_grpc.GeneratorStub(channel)


def generate(stub: pb_grpc.GeneratorStub, session_id: str, max_chars: int, **fields: object) -> str:
    return "".join(r.text for r in stub.Generate(pb.GenerateRequest(session_id=session_id, max_chars=max_chars,
                                                                     **fields)))


def create(stub: pb_grpc.GeneratorStub, seed: int = 7, temperature: float = 0.9) -> str:
    return stub.CreateSession(pb.CreateSessionRequest(prompt=PROMPT, seed=seed, temperature=temperature)).session_id


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_fork_continues_like_the_source(stub: pb_grpc.GeneratorStub, temperature: float) -> None:
    reference = create(stub, temperature=temperature)
    whole = generate(stub, reference, 150)
    source = create(stub, temperature=temperature)
    head = generate(stub, source, 50)
    fork = stub.ForkSession(pb.ForkSessionRequest(session_id=source))
    assert fork.session_id != source
    assert fork.session.consumed_chars == len(PROMPT) + 50
    assert fork.session.recent_text == (PROMPT + head)[-256:]
    assert fork.session.temperature == pytest.approx(temperature)
    # Both continue independently, each exactly as the uninterrupted session did.
    assert head + generate(stub, fork.session_id, 100) == whole
    assert head + generate(stub, source, 100) == whole


def test_export_import_continues_on_another_server(stub: pb_grpc.GeneratorStub, tiny_model_dir: Path) -> None:
    reference = create(stub, seed=3)
    whole = generate(stub, reference, 120)
    source = create(stub, seed=3)
    head = generate(stub, source, 40)
    state = stub.ExportSession(pb.ExportSessionRequest(session_id=source)).state
    record = decode_record(state)
    assert record.snapshot.consumed_chars == len(PROMPT) + 40
    with BackgroundServer(config(tiny_model_dir)) as other, grpc.insecure_channel(other.address) as channel:
        other_stub = pb_grpc.GeneratorStub(channel)
        imported = other_stub.ImportSession(pb.ImportSessionRequest(state=state))
        assert imported.session.consumed_chars == len(PROMPT) + 40
        assert imported.session.recent_text == (PROMPT + head)[-256:]
        assert head + generate(other_stub, imported.session_id, 80) == whole
    # Exporting left the source as it was.
    assert head + generate(stub, source, 80) == whole


def test_import_of_a_record_for_another_model_fails_precondition(stub: pb_grpc.GeneratorStub) -> None:
    state = stub.ExportSession(pb.ExportSessionRequest(session_id=create(stub))).state
    record = decode_record(state)
    other_model = dataclasses.replace(record.model, sha256="0" * 64)
    forged = encode_record(dataclasses.replace(record, model=other_model))
    with pytest.raises(grpc.RpcError) as failure:
        stub.ImportSession(pb.ImportSessionRequest(state=forged))
    assert failure.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "00000000" in failure.value.details()


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage", "empty"])
def test_import_of_a_damaged_record_is_invalid(stub: pb_grpc.GeneratorStub, damage: str) -> None:
    state = stub.ExportSession(pb.ExportSessionRequest(session_id=create(stub))).state
    bad = {
        "truncate": state[: len(state) // 2],
        "flip": state[:40] + bytes([state[40] ^ 0x01]) + state[41:],
        "garbage": b"\x00garbage" * 10,
        "empty": b"",
    }[damage]
    before = len(stub.ListSessions(pb.ListSessionsRequest()).sessions)
    with pytest.raises(grpc.RpcError) as failure:
        stub.ImportSession(pb.ImportSessionRequest(state=bad))
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "record" in failure.value.details()
    assert len(stub.ListSessions(pb.ListSessionsRequest()).sessions) == before  # nothing half-made


def test_fork_and_export_of_unknown_or_busy_sessions(stub: pb_grpc.GeneratorStub) -> None:
    for call, request in ((stub.ForkSession, pb.ForkSessionRequest), (stub.ExportSession, pb.ExportSessionRequest)):
        with pytest.raises(grpc.RpcError) as failure:
            call(request(session_id="f" * 32))
        assert failure.value.code() == grpc.StatusCode.NOT_FOUND
    session_id = create(stub)
    stream = stub.Generate(pb.GenerateRequest(session_id=session_id, max_chars=20_000 // 3))
    next(stream)  # the session is busy now
    try:
        with pytest.raises(grpc.RpcError) as failure:
            stub.ForkSession(pb.ForkSessionRequest(session_id=session_id))
        assert failure.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    finally:
        stream.cancel()


def cache_metric(server: BackgroundServer, name: str) -> float:
    assert server.running is not None and server.running.metrics_endpoint is not None
    url = f"http://127.0.0.1:{server.running.metrics_endpoint.port}/metrics"
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    match = re.search(rf"^{name} ([0-9.e+]+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def one_shot(stub: pb_grpc.GeneratorStub, prompt: str, seed: int) -> str:
    request = pb.GenerateRequest(prompt=prompt, max_chars=60, seed=seed, temperature=0.8)
    return "".join(r.text for r in stub.Generate(request))


def test_prefix_cache_skips_prompts_and_changes_no_text(tiny_model_dir: Path) -> None:
    long_prompt = ("To be, or not to be, that is the question: " * 8)[:300]
    prompts = [long_prompt, long_prompt + "Whether", long_prompt[:120], long_prompt]
    with BackgroundServer(config(tiny_model_dir, prefix_cache_bytes=0)) as plain, \
            grpc.insecure_channel(plain.address) as channel:
        expected = [one_shot(pb_grpc.GeneratorStub(channel), p, seed) for seed, p in enumerate(prompts)]
    with BackgroundServer(config(tiny_model_dir)) as cached, grpc.insecure_channel(cached.address) as channel:
        cached_stub = pb_grpc.GeneratorStub(channel)
        got = [one_shot(cached_stub, p, seed) for seed, p in enumerate(prompts)]
        # A CreateSession whose prompt starts with a cached text continues like an uncached one.
        session_id = cached_stub.CreateSession(pb.CreateSessionRequest(prompt=long_prompt + "Whether", seed=1,
                                                                        temperature=0.8)).session_id
        from_session = generate(cached_stub, session_id, 60)
        hits = cache_metric(cached, 'charstream_prefix_cache_lookups_total{result="hit"}')
        skipped = cache_metric(cached, "charstream_prefix_cache_skipped_chars_total")
        held = cache_metric(cached, "charstream_prefix_cache_bytes")
        info = cached_stub.GetModelInfo(pb.GetModelInfoRequest())
    assert got == expected
    assert from_session == expected[1]
    # Prompt 2 starts after prompt 1 (300 chars), prompt 4 is prompt 1 again (300), the session's
    # prompt is prompt 2 (307); prompt 3 is shorter than anything cached before it.
    assert hits == 3
    assert skipped == 300 + 300 + 307
    # Held: the state after each prompt consumed in part or in full (prompts 1, 2 and 3), at its budget charge.
    hidden, logits = np.zeros((info.num_layers, info.hidden_size)), np.zeros(info.vocab_size)
    assert held == sum(entry_nbytes(text, hidden, logits) for text in prompts[:3])


def test_python_client_forks_exports_and_imports(server: BackgroundServer) -> None:
    from server.clients.client import CharstreamClient

    with CharstreamClient(server.address) as client:
        reference = client.create_session(prompt=PROMPT, seed=5, temperature=0.9)
        whole = "".join(reference.generate(max_chars=80))
        session = client.create_session(prompt=PROMPT, seed=5, temperature=0.9)
        head = "".join(session.generate(max_chars=30))
        fork = session.fork()
        moved = client.import_session(session.export())
        assert fork.id != session.id != moved.id
        assert head + "".join(fork.generate(max_chars=50)) == whole
        assert head + "".join(moved.generate(max_chars=50)) == whole
        assert head + "".join(session.generate(max_chars=50)) == whole
