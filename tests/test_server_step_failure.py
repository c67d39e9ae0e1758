"""A model step that raises on a real server: the call fails as INTERNAL without the error's details,
the one-shot session is freed and later calls are served; a session whose state was lost refuses
its next call without counting that call's prompt as consumed."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import grpc

from protos.charstream.v1 import generator_pb2 as pb
from protos.charstream.v1 import generator_pb2_grpc as pb_grpc
from server.background import BackgroundServer
from server.config import ServerConfig
from server.engine.runner.model_runner import load_runner
from server.engine.sampling import SamplingSettings
from tests.plain_loop import onnx_loop
from tests.test_server_lifecycle import _error


@contextmanager
def _server_whose_first_step_fails(tiny_model_dir: Path, message: str) -> Iterator[tuple[BackgroundServer, pb_grpc.GeneratorStub]]:
    """A real server whose first model step raises `message` (a device failure stand-in)."""
    runner = load_runner(tiny_model_dir, device="cpu", num_slots=2)
    real_step, failures = runner.step, [1]

    def failing_step(*args: object) -> object:
        if failures:
            failures.pop()
            raise RuntimeError(message)
        return real_step(*args)

    runner.step = failing_step  # type: ignore[method-assign]
    # Without stretches: a lone session's calls would go through the Loop graph, not the step.
    config = ServerConfig(model=str(tiny_model_dir), port=0, device="cpu", max_sessions=2, stretch=False)
    with BackgroundServer(config, runner=runner) as server, grpc.insecure_channel(server.address) as channel:
        yield server, pb_grpc.GeneratorStub(channel)


def test_a_failed_model_step_is_internal_without_its_details_and_frees_the_one_shot_session(
    tiny_model_dir: Path,
) -> None:
    with _server_whose_first_step_fails(tiny_model_dir, "simulated device failure in /opt/private/libkernel.so") as (
        server,
        stub,
    ):
        error = _error(lambda r: list(stub.Generate(r, timeout=30)), pb.GenerateRequest(prompt="To", max_chars=5))
        assert error.code() == grpc.StatusCode.INTERNAL and "server log" in error.details()
        assert "simulated" not in error.details() and "/opt/private" not in error.details()
        assert server.running is not None and len(server.running.service.store) == 0
        recovered = "".join(r.text for r in stub.Generate(pb.GenerateRequest(prompt="To", max_chars=5, seed=8)))
        assert recovered == onnx_loop(tiny_model_dir, "To", 5, SamplingSettings(), seed=8)


def test_a_refused_call_does_not_count_its_prompt_as_consumed(tiny_model_dir: Path) -> None:
    with _server_whose_first_step_fails(tiny_model_dir, "simulated device failure") as (_, stub):
        session_id = stub.CreateSession(pb.CreateSessionRequest()).session_id
        failed = _error(lambda r: list(stub.Generate(r, timeout=30)),
                        pb.GenerateRequest(session_id=session_id, prompt="To", max_chars=5))  # fmt: skip
        assert failed.code() == grpc.StatusCode.INTERNAL  # the step failed: the state is lost
        before = stub.GetSession(pb.GetSessionRequest(session_id=session_id)).session.consumed_chars
        refused = _error(lambda r: list(stub.Generate(r, timeout=30)),
                         pb.GenerateRequest(session_id=session_id, prompt=" be", max_chars=5))  # fmt: skip
        assert refused.code() == grpc.StatusCode.FAILED_PRECONDITION and "reset" in refused.details()
        after = stub.GetSession(pb.GetSessionRequest(session_id=session_id)).session.consumed_chars
        assert after == before  # the refused call's prompt never reached the state
