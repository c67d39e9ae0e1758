"""--frontends: several gRPC front-end processes on one port over one engine process, with a
real server in a subprocess. Any front-end serves any session; a front-end killed with SIGKILL
ends only its own streams, whose sessions keep exactly what was delivered, and the others go on
(and a replacement starts); SIGTERM drains every front-end and the server exits 0."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Iterator

import grpc
import pytest

from protos.charstream.v1 import generator_pb2 as pb
from protos.charstream.v1 import generator_pb2_grpc as pb_grpc
from server.engine.sampling import SamplingSettings
from tests.frontends_server import FrontendsServer
from tests.plain_loop import onnx_loop

PROMPT = "To be"
CHARS = 4000  # a killed front-end's streams are cut well before their end
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]  # a channel of its own: a connection of its own


def channel(address: str) -> grpc.Channel:
    return grpc.insecure_channel(address, options=OWN_CONNECTION)


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path) -> Iterator[FrontendsServer]:
    with FrontendsServer(tiny_model_dir, 2, "--lookahead", "16", "--max-chars", "20000") as running:
        yield running


def test_any_frontend_serves_any_session(server: FrontendsServer, tiny_model_dir: Path) -> None:
    """Each call on its own connection (the kernel spreads them over the front-ends): the session's
    text is the uninterrupted reference, and every session RPC sees the same sessions."""
    stubs = [pb_grpc.GeneratorStub(channel(server.address)) for _ in range(6)]
    session_id = stubs[0].CreateSession(pb.CreateSessionRequest(prompt=PROMPT, seed=11, temperature=0.8)).session_id
    parts = ["".join(r.text for r in stub.Generate(pb.GenerateRequest(session_id=session_id, max_chars=40)))
             for stub in stubs]
    assert "".join(parts) == onnx_loop(tiny_model_dir, PROMPT, 240, SamplingSettings(temperature=0.8), seed=11)
    info = stubs[1].GetSession(pb.GetSessionRequest(session_id=session_id)).session
    assert info.consumed_chars == len(PROMPT) + 240 and not info.busy
    assert session_id in [s.session_id for s in stubs[2].ListSessions(pb.ListSessionsRequest()).sessions]
    fork = stubs[3].ForkSession(pb.ForkSessionRequest(session_id=session_id)).session_id
    exported = stubs[4].ExportSession(pb.ExportSessionRequest(session_id=session_id)).state
    imported = stubs[5].ImportSession(pb.ImportSessionRequest(state=exported)).session_id
    continued = {"".join(r.text for r in stub.Generate(pb.GenerateRequest(session_id=sid, max_chars=30)))
                 for stub, sid in zip(stubs, (session_id, fork, imported))}
    assert len(continued) == 1  # the same state and random stream, whichever front-end continues it
    stubs[0].DeleteSession(pb.DeleteSessionRequest(session_id=fork))
    with pytest.raises(grpc.RpcError) as gone:
        stubs[1].GetSession(pb.GetSessionRequest(session_id=fork))
    assert gone.value.code() == grpc.StatusCode.NOT_FOUND and "deleted" in gone.value.details()


def test_a_session_busy_on_one_frontend_is_busy_on_the_others(server: FrontendsServer) -> None:
    first, second = (pb_grpc.GeneratorStub(channel(server.address)) for _ in range(2))
    session_id = first.CreateSession(pb.CreateSessionRequest(prompt=PROMPT, seed=1)).session_id
    stream = first.Generate(pb.GenerateRequest(session_id=session_id, max_chars=20000))
    next(stream)
    with pytest.raises(grpc.RpcError) as busy:
        next(second.Generate(pb.GenerateRequest(session_id=session_id, max_chars=5)))
    assert busy.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "busy" in busy.value.details()
    stream.cancel()


async def _slow_stream(address: str, seed: int, started: asyncio.Queue | None = None) -> dict:
    """Create a session, then read its stream slowly until the stream ends, one way or another
    (`started` hears of its first message)."""
    async with grpc.aio.insecure_channel(address, options=OWN_CONNECTION) as aio_channel:
        stub = pb_grpc.GeneratorStub(aio_channel)
        session_id = (await stub.CreateSession(pb.CreateSessionRequest(prompt=PROMPT, seed=seed,
                                                                        temperature=0.9))).session_id
        received, code = "", grpc.StatusCode.OK
        try:
            async for response in stub.Generate(pb.GenerateRequest(session_id=session_id, max_chars=CHARS)):
                if not received and started is not None:
                    started.put_nowait(seed)
                received += response.text
                await asyncio.sleep(0.02)  # a slow reader: at most a lookahead (16) per message, ~5 s in all
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
        return {"seed": seed, "session": session_id, "received": received, "code": code}


def _settled(stub: pb_grpc.GeneratorStub, session_id: str) -> pb.SessionInfo:
    deadline = time.monotonic() + 30
    while True:
        info = stub.GetSession(pb.GetSessionRequest(session_id=session_id)).session
        if not info.busy or time.monotonic() > deadline:
            return info
        time.sleep(0.05)


def test_a_killed_frontend_ends_only_its_streams_and_its_sessions_keep_what_was_delivered(
        tiny_model_dir: Path) -> None:
    with FrontendsServer(tiny_model_dir, 2, "--lookahead", "16") as server:
        victim = server.frontend_pids()[0]

        async def scenario() -> list[dict]:
            started: asyncio.Queue = asyncio.Queue()
            streams = [asyncio.ensure_future(_slow_stream(server.address, seed, started)) for seed in range(16)]
            for _ in streams:  # every stream is under way
                await asyncio.wait_for(started.get(), 30)
            os.kill(victim, signal.SIGKILL)
            return await asyncio.gather(*streams)

        runs = asyncio.run(scenario())
        cut = [run for run in runs if run["code"] != grpc.StatusCode.OK]
        whole = [run for run in runs if run["code"] == grpc.StatusCode.OK]
        assert cut and whole, f"16 connections should reach both front-ends: {[(r['code'], len(r['received'])) for r in runs]}\n{server.log()[-3000:]}"
        stub = pb_grpc.GeneratorStub(channel(server.address))
        for run in whole:  # the other front-end's streams never noticed
            assert run["received"] == onnx_loop(tiny_model_dir, PROMPT, CHARS, SamplingSettings(temperature=0.9),
                                                seed=run["seed"])
        for run in cut:
            assert run["code"] == grpc.StatusCode.UNAVAILABLE
            reference = onnx_loop(tiny_model_dir, PROMPT, CHARS, SamplingSettings(temperature=0.9), seed=run["seed"])
            info = _settled(stub, run["session"])
            kept = info.consumed_chars - len(PROMPT)
            assert not info.busy
            # It keeps what was handed over: at least what arrived, never more than was generated.
            assert reference.startswith(run["received"]) and len(run["received"]) <= kept < CHARS
            assert info.recent_text == (PROMPT + reference[:kept])[-256:]
            rest = "".join(r.text for r in stub.Generate(pb.GenerateRequest(session_id=run["session"],
                                                                            max_chars=CHARS - kept)))
            assert reference[:kept] + rest == reference  # and continues exactly from there
        server.wait_for_ready_count(3)  # a replacement took the dead one's place
        assert victim not in server.frontend_pids()


def test_sigterm_drains_every_frontend_and_exits_zero(tiny_model_dir: Path) -> None:
    # Streams far longer than the tiny model generates before the grace ends: with 10,000 characters
    # a fast run finished some of them first (acknowledged as written, the rest waiting in gRPC's
    # buffers), and they ended by length instead.
    server = FrontendsServer(tiny_model_dir, 2, "--lookahead", "16", "--max-chars", "1000000").start()
    try:
        async def scenario() -> list[list[pb.GenerateResponse]]:
            async def read(seed: int) -> list[pb.GenerateResponse]:
                async with grpc.aio.insecure_channel(server.address, options=OWN_CONNECTION) as aio_channel:
                    stub = pb_grpc.GeneratorStub(aio_channel)
                    replies = []
                    async for reply in stub.Generate(pb.GenerateRequest(prompt=PROMPT, seed=seed, max_chars=1_000_000)):
                        replies.append(reply)
                        await asyncio.sleep(0.01)
                    return replies

            streams = [asyncio.ensure_future(read(seed)) for seed in range(8)]
            await asyncio.sleep(1.0)
            server.process.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
            return await asyncio.gather(*streams)

        streams = asyncio.run(scenario())
        assert all(replies[-1].finish_reason == pb.FINISH_REASON_SHUTDOWN for replies in streams)
        assert server.process.wait(30) == 0  # type: ignore[union-attr]
    finally:
        server.stop()
    assert "event=shutdown_complete" in server.log()


def test_keys_and_per_key_limits_hold_over_every_frontend(tiny_model_dir: Path, tmp_path: Path) -> None:
    keys = tmp_path / "keys.txt"
    keys.write_text("alice:secret-of-alice-0123456789\nbob:secret-of-bob-0123456789\n")
    with FrontendsServer(tiny_model_dir, 2, "--api-keys", str(keys), "--max-streams-per-key", "2",
                         "--max-sessions-per-key", "3") as server:
        alice = [(("authorization", "Bearer secret-of-alice-0123456789"),)] * 4
        stubs = [pb_grpc.GeneratorStub(channel(server.address)) for _ in range(4)]
        bob = pb_grpc.GeneratorStub(channel(server.address))
        bob_key = (("authorization", "Bearer secret-of-bob-0123456789"),)
        session_id = stubs[0].CreateSession(pb.CreateSessionRequest(prompt=PROMPT), metadata=alice[0]).session_id
        with pytest.raises(grpc.RpcError) as hidden:
            bob.GetSession(pb.GetSessionRequest(session_id=session_id), metadata=bob_key)
        assert hidden.value.code() == grpc.StatusCode.NOT_FOUND  # another key's session does not exist
        # Two long streams of alice's on two connections: a third, on any front-end, is refused.
        streams = [stub.Generate(pb.GenerateRequest(prompt=PROMPT, max_chars=10000), metadata=alice[0])
                   for stub in stubs[:2]]
        for stream in streams:
            next(stream)
        for stub in stubs[2:]:
            with pytest.raises(grpc.RpcError) as limited:
                next(stub.Generate(pb.GenerateRequest(prompt=PROMPT, max_chars=5), metadata=alice[0]))
            assert limited.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-streams-per-key" in \
                limited.value.details()
        assert "".join(r.text for r in bob.Generate(pb.GenerateRequest(prompt=PROMPT, max_chars=20),
                                                    metadata=bob_key))  # bob's own limit is untouched
        for stream in streams:
            stream.cancel()
        deadline = time.monotonic() + 10  # the streams' slots free once their front-ends notice the cancel
        while True:
            try:
                text = "".join(r.text for r in stubs[3].Generate(pb.GenerateRequest(prompt=PROMPT, max_chars=5),
                                                                  metadata=alice[0]))
                break
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and time.monotonic() < deadline
                time.sleep(0.05)
        assert len(text) == 5


def test_http_and_metrics_of_every_frontend_on_one_port(tiny_model_dir: Path) -> None:
    import urllib.request

    from tests.http_client import Http

    with FrontendsServer(tiny_model_dir, 2, "--http-port", "0") as server:
        port = int(server.http_url.rstrip("/").rsplit(":", 1)[1])
        texts = [Http(port).call("POST", "/v1/generate", {"prompt": PROMPT, "max_chars": 50, "seed": 4}).json()
                 for _ in range(6)]  # a connection each: both front-ends answer
        assert {t["text"] for t in texts} == {onnx_loop(tiny_model_dir, PROMPT, 50, SamplingSettings(), seed=4)}
        for _ in range(6):
            "".join(r.text for r in pb_grpc.GeneratorStub(channel(server.address)).Generate(
                pb.GenerateRequest(prompt=PROMPT, max_chars=50)))
        metrics = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
        counted = float(next(line.split()[-1] for line in metrics.splitlines()
                             if line.startswith("charstream_generated_chars_total ")))
        assert counted == 12 * 50  # every front-end's characters, counted once
        stubs = [pb_grpc.GeneratorStub(channel(server.address)) for _ in range(4)]
        made = [stub.CreateSession(pb.CreateSessionRequest(prompt=PROMPT)).session_id for stub in stubs]
        stubs[0].DeleteSession(pb.DeleteSessionRequest(session_id=made[1]))

        def sessions_metric() -> float:
            text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
            return float(next(line.split()[-1] for line in text.splitlines()
                              if line.startswith("charstream_active_sessions ")))

        deadline = time.monotonic() + 10  # the engine tells one front-end when the count changes
        while sessions_metric() != 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sessions_metric() == 3  # the engine's count, once, whichever front-end made them


def test_when_the_engine_dies_every_frontend_exits_and_so_does_the_server(tiny_model_dir: Path) -> None:
    import re

    server = FrontendsServer(tiny_model_dir, 2).start()
    try:
        engine_pid = int(re.search(r"event=listening .*engine_pid=(\d+)", server.log()).group(1))  # type: ignore[union-attr]
        frontends = server.frontend_pids()
        os.kill(engine_pid, signal.SIGKILL)
        assert server.process.wait(60) == 3  # type: ignore[union-attr]
        for pid in frontends:  # none is left behind
            assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
    finally:
        server.stop()


def test_a_second_server_on_the_port_is_refused(server: FrontendsServer, tiny_model_dir: Path) -> None:
    import subprocess
    import sys

    port = server.address.rsplit(":", 1)[1]
    second = subprocess.run([sys.executable, "-m", "server", "--model", str(tiny_model_dir), "--port", port,
                             "--frontends", "2"], capture_output=True, text=True, timeout=120)
    assert second.returncode == 2 and "cannot listen" in second.stderr  # never a silent share of the port


def test_a_session_call_cancelled_while_waiting_is_undone_at_the_engine() -> None:
    """The engine carries out an acquire whose caller was cancelled while waiting for the answer:
    the front-end then releases it, or the session would stay busy for good."""
    from types import SimpleNamespace

    from server.frontends.remote_sessions import RemoteSessions
    from server.sessions.memory import Session

    sent: list[tuple] = []
    engine = SimpleNamespace(gone=False, send=sent.append, on_message=None, on_closed=None)

    async def scenario() -> None:
        sessions = RemoteSessions(engine, 8, 60.0)  # type: ignore[arg-type]
        call = asyncio.ensure_future(sessions.acquire("a" * 32, ""))
        await asyncio.sleep(0)
        call.cancel()
        await asyncio.sleep(0)
        (_, token, operation, _), = sent
        assert operation == "acquire"
        held = Session("a" * 32, 3, SamplingSettings(), 0.0, 0.0, consumed_chars=7, recent_text="To be, ", busy=True)
        sessions._on_message(("session", token, held, None))
        await asyncio.sleep(0)
        assert call.cancelled()

    asyncio.run(scenario())
    assert [command[2:] for command in sent[1:]] == [("release", ("a" * 32, 7, "To be, "))]
