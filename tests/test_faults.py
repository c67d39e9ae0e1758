"""Faults: a client killed mid-stream, a model step that raises among concurrent streams, SIGTERM
under load, and a corrupt model file at start-up. Each checks the session text promises (kept text
exactly what was handed over, continuation exactly the uninterrupted text) where they apply, and
every wait is bounded."""

from __future__ import annotations

import asyncio
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import grpc
import pytest

from protos.charstream.v1 import generator_pb2 as pb
from protos.charstream.v1 import generator_pb2_grpc as pb_grpc
from server.background import BackgroundServer
from server.config import ServerConfig
from server.engine.runner.model_runner import load_runner

REPO_ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
PROMPT = "To be, or not"
LONG = 1_000_000  # a stream that only a fault ends


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path) -> Iterator[BackgroundServer]:
    config = ServerConfig(model=str(tiny_model_dir), port=0, device="cpu", max_sessions=128, max_chars=LONG)
    with BackgroundServer(config) as running:
        yield running


def _settled(stub: pb_grpc.GeneratorStub, session_id: str, bound: float) -> tuple[pb.SessionInfo, float]:
    """The session once no call holds it, and how long that took; fails after `bound` seconds."""
    started = time.monotonic()
    while True:
        info = stub.GetSession(pb.GetSessionRequest(session_id=session_id), timeout=10).session
        waited = time.monotonic() - started
        if not info.busy:
            return info, waited
        assert waited < bound, f"session still busy after {bound} s"
        time.sleep(0.02)


def _text(stub: pb_grpc.GeneratorStub, session_id: str, chars: int) -> str:
    request = pb.GenerateRequest(session_id=session_id, max_chars=chars)
    return "".join(r.text for r in stub.Generate(request, timeout=60))


def _reference(stub: pb_grpc.GeneratorStub, seed: int, temperature: float, chars: int) -> str:
    """The uninterrupted text of a fresh session with PROMPT, `seed` and `temperature`."""
    created = stub.CreateSession(pb.CreateSessionRequest(prompt=PROMPT, seed=seed, temperature=temperature))
    try:
        return _text(stub, created.session_id, chars) if chars else ""
    finally:
        stub.DeleteSession(pb.DeleteSessionRequest(session_id=created.session_id))


def _lines(stream: object) -> "queue.Queue[str]":
    """A process's output lines on a queue, so that reading them can time out."""
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in stream], daemon=True).start()  # type: ignore
    return lines


KILLED_CLIENT = f"""
import sys, grpc
from protos.charstream.v1 import generator_pb2 as pb, generator_pb2_grpc as pb_grpc
with grpc.insecure_channel(sys.argv[1]) as channel:
    stub = pb_grpc.GeneratorStub(channel)
    reply = stub.CreateSession(pb.CreateSessionRequest(prompt={PROMPT!r}, seed=7, temperature=0.9))
    print(reply.session_id, flush=True)
    for n, _ in enumerate(stub.Generate(pb.GenerateRequest(session_id=reply.session_id, max_chars={LONG}))):
        if n == 0:
            print("streaming", flush=True)
"""


def test_a_client_killed_mid_stream_frees_its_session_which_continues_exactly(server: BackgroundServer) -> None:
    client = subprocess.Popen([sys.executable, "-c", KILLED_CLIENT, server.address], cwd=REPO_ROOT, env=ENV,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        lines = _lines(client.stdout)
        session_id = lines.get(timeout=30).strip()
        assert lines.get(timeout=30).strip() == "streaming"
        time.sleep(0.3)  # mid-stream
        client.send_signal(signal.SIGKILL)
        assert client.wait(timeout=10) == -signal.SIGKILL
    finally:
        if client.poll() is None:
            client.kill()
            client.wait(timeout=10)
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.GeneratorStub(channel)
        # The kernel closes a killed process's socket: the server sees the stream end at once,
        # without waiting for keepalive pings (20 s + 10 s) to find the peer gone.
        info, waited = _settled(stub, session_id, bound=5.0)
        kept = info.consumed_chars - len(PROMPT)
        assert kept > 0, "the client was streaming: the session holds what was handed over"
        rest = _text(stub, session_id, 200)
        reference = _reference(stub, seed=7, temperature=0.9, chars=kept + 200)
        stub.DeleteSession(pb.DeleteSessionRequest(session_id=session_id))
    assert waited < 5.0
    assert info.recent_text == (PROMPT + reference[:kept])[-256:]
    assert reference[:kept] + rest == reference


def test_a_failed_step_ends_only_the_stream_in_it_and_the_others_keep_going(tiny_model_dir: Path) -> None:
    """With --max-batch 1 each step holds one stream: the failure of one step ends that stream alone.

    A lone stream whose first step fails is covered in test_server_lifecycle.py
    (test_a_failed_model_step_is_internal_without_its_details_and_frees_the_one_shot_session,
    test_a_refused_call_does_not_count_its_prompt_as_consumed); here the others run on, exactly.
    """
    runner = load_runner(tiny_model_dir, device="cpu", num_slots=8)
    real_step, armed, failures = runner.step, threading.Event(), [1]

    def step_failing_once_armed(*args: object) -> object:
        if armed.is_set() and failures:
            failures.pop()
            raise RuntimeError("simulated device failure")
        return real_step(*args)

    runner.step = step_failing_once_armed  # type: ignore[method-assign]
    config = ServerConfig(model=str(tiny_model_dir), port=0, device="cpu", max_sessions=8, max_batch=1)
    seeds, chars = [11, 12, 13, 14], 1500

    async def one(stub: pb_grpc.GeneratorStub, seed: int, started: asyncio.Event) -> tuple[str, str, str]:
        reply = await stub.CreateSession(pb.CreateSessionRequest(prompt=PROMPT, seed=seed, temperature=0.9))
        received, reason = "", ""
        try:
            async for response in stub.Generate(pb.GenerateRequest(session_id=reply.session_id, max_chars=chars),
                                                timeout=60):
                received += response.text
                started.set()
                reason = pb.FinishReason.Name(response.finish_reason)
        except grpc.aio.AioRpcError as exc:
            reason = exc.code().name
        return reply.session_id, received, reason

    async def scenario(address: str) -> list[tuple[str, str, str]]:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = pb_grpc.GeneratorStub(channel)
            started = [asyncio.Event() for _ in seeds]
            tasks = [asyncio.ensure_future(one(stub, s, e)) for s, e in zip(seeds, started)]
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 30)
            armed.set()  # every stream is generating: the next step fails
            return await asyncio.wait_for(asyncio.gather(*tasks), 60)

    with BackgroundServer(config, runner=runner) as running, grpc.insecure_channel(running.address) as channel:
        results = asyncio.run(scenario(running.address))
        stub = pb_grpc.GeneratorStub(channel)
        references = [_reference(stub, seed, 0.9, chars) for seed in seeds]
        reasons = [reason for _, _, reason in results]
        assert sorted(reasons) == ["FINISH_REASON_LENGTH"] * 3 + ["INTERNAL"], reasons
        for (session_id, received, reason), reference, reference_seed in zip(results, references, seeds):
            if reason == "INTERNAL":  # its state is lost: refused until reset, then usable again
                assert reference.startswith(received) and len(received) < chars
                refused = pytest.raises(grpc.RpcError, _text, stub, session_id, 5)
                assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
                stub.ResetSession(pb.ResetSessionRequest(session_id=session_id, prompt=PROMPT, seed=reference_seed))
                assert _text(stub, session_id, 5) == reference[:5]  # as a fresh session with that seed
            else:
                assert received == reference


GRACE, MARGIN = 2.0, 3.0  # the margin: the last step, the goodbye messages and the process's own exit


def _start_server(model: Path, log: Path, *flags: str) -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen([sys.executable, "-m", "server", "--model", str(model), "--port", "0", "--device",
                                "cpu", *flags], cwd=REPO_ROOT, env=ENV, stdout=subprocess.PIPE,
                               stderr=log.open("w"), text=True)
    line = _lines(process.stdout).get(timeout=60)
    found = re.fullmatch(r"listening on (\S+)\n", line)
    assert found, f"unexpected first line {line!r}; log: {log.read_text()}"
    return process, found.group(1)


async def _streams_until_shutdown(address: str, seeds: list[int], process: subprocess.Popen) -> tuple[float, list]:
    """Every seed's stream running, then SIGTERM: (when it was sent, [(text, ending, seconds after)])."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.GeneratorStub(channel)
        started = [asyncio.Event() for _ in seeds]
        signalled: list[float] = []

        async def one(seed: int, running: asyncio.Event) -> tuple[str, str, float]:
            reply = await stub.CreateSession(pb.CreateSessionRequest(prompt=PROMPT, seed=seed, temperature=0.9))
            received, ending = "", "no finish reason"
            try:
                async for response in stub.Generate(pb.GenerateRequest(session_id=reply.session_id, max_chars=LONG),
                                                    timeout=GRACE + 30):
                    received += response.text
                    running.set()
                    if response.finish_reason:
                        ending = pb.FinishReason.Name(response.finish_reason)
            except grpc.aio.AioRpcError as exc:
                ending = exc.code().name
            return received, ending, time.monotonic() - signalled[0]

        tasks = [asyncio.ensure_future(one(seed, event)) for seed, event in zip(seeds, started)]
        await asyncio.wait_for(asyncio.gather(*(event.wait() for event in started)), 60)
        await asyncio.sleep(0.5)  # all 32 generating for a while: the signal lands under load
        signalled.append(time.monotonic())
        process.send_signal(signal.SIGTERM)
        return signalled[0], await asyncio.wait_for(asyncio.gather(*tasks), GRACE + 30)


def test_sigterm_under_load_ends_every_stream_within_the_grace_and_keeps_exact_prefixes(
    tiny_model_dir: Path, tmp_path: Path, server: BackgroundServer,
) -> None:
    log = tmp_path / "server.log"
    process, address = _start_server(tiny_model_dir, log, "--shutdown-grace", str(GRACE), "--max-chars", str(LONG))
    try:
        seeds = list(range(200, 232))  # 32 streams
        signalled, results = asyncio.run(_streams_until_shutdown(address, seeds, process))
        exit_status = process.wait(timeout=GRACE + MARGIN)
        exited_after = time.monotonic() - signalled
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
    assert exit_status == 0, log.read_text()
    assert exited_after <= GRACE + MARGIN
    for received, ending, seconds in results:
        assert ending == "FINISH_REASON_SHUTDOWN" or ending in ("UNAVAILABLE", "CANCELLED"), ending
        assert seconds <= GRACE + MARGIN
    # Seeds make the text reproducible on another server: what each stream delivered is exactly
    # the start of its uninterrupted text.
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.GeneratorStub(channel)
        for seed, (received, _, _) in zip(seeds, results):
            assert received and received == _reference(stub, seed, 0.9, len(received))


def _corrupt(model: Path, tmp_path: Path, how: str) -> Path:
    copy = tmp_path / f"model-{how}"
    shutil.copytree(model, copy)
    onnx_file = copy / "model.onnx"
    data = onnx_file.read_bytes()
    onnx_file.write_bytes(b"\x07garbage, not an ONNX protobuf\xff" * 64 if how == "garbage" else data[: len(data) // 2])
    return onnx_file


@pytest.mark.parametrize("how", ["garbage", "truncated"])
def test_a_corrupt_model_file_is_a_one_line_start_up_error_naming_it(
    tiny_model_dir: Path, tmp_path: Path, how: str,
) -> None:
    onnx_file = _corrupt(tiny_model_dir, tmp_path, how)
    result = subprocess.run([sys.executable, "-m", "server", "--model", str(onnx_file.parent), "--port", "0",
                             "--device", "cpu"], cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=60)
    errors = [line for line in result.stderr.splitlines() if line.startswith("charstream-serve: error:")]
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert len(errors) == 1 and str(onnx_file) in errors[0], result.stderr
