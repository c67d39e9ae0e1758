"""The gRPC service end to end: a real grpc.aio server on a loopback port with the tiny
exported model, called over the network by the synchronous gRPC client. Every test runs on one
server process and on two front-ends over one engine process (--frontends 2, a subprocess,
where the sessions live in the engine process)."""

from __future__ import annotations

import math
import threading
from concurrent.futures import ThreadPoolExecutor
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
from tests.plain_loop import onnx_loop, wire

MAX_CHARS = 20_000


@pytest.fixture(scope="module", params=[1, 2], ids=["frontends1", "frontends2"])
def server(request: pytest.FixtureRequest, tiny_model_dir: Path) -> Iterator[BackgroundServer | FrontendsServer]:
    if request.param == 1:
        config = ServerConfig(model=str(tiny_model_dir), port=0, device="cpu", max_sessions=64, max_chars=MAX_CHARS,
                              max_prompt_chars=1000)
        with BackgroundServer(config) as running:
            yield running
        return
    with FrontendsServer(tiny_model_dir, request.param, "--max-sessions", "64", "--max-chars", str(MAX_CHARS),
                         "--max-prompt-chars", "1000") as frontends:
        yield frontends


@pytest.fixture(scope="module")
def stub(server: BackgroundServer) -> Iterator[pb_grpc.GeneratorStub]:
    with grpc.insecure_channel(server.address) as channel:
        yield pb_grpc.GeneratorStub(channel)


def generate(stub: pb_grpc.GeneratorStub, **fields: object) -> tuple[str, pb.GenerateResponse]:
    """Run a Generate call to the end: (all text, last message)."""
    responses = list(stub.Generate(pb.GenerateRequest(**fields), timeout=60))
    return "".join(r.text for r in responses), responses[-1]


def torch_greedy(checkpoint: Path, prompt: str, n: int) -> str:
    torch = pytest.importorskip("torch")
    from training.checkpoint import load_model

    model, vocab, _ = load_model(checkpoint)
    with torch.no_grad():
        logits, hidden = model(torch.tensor([vocab.encode(prompt)]), None)  # [1, T, V], [L, 1, H]
        out = []
        for _ in range(n):
            token = int(torch.argmax(logits[0, -1]))
            out.append(token)
            logits, hidden = model(torch.tensor([[token]]), hidden)
    return vocab.decode(out)


def test_model_info_describes_the_model_and_provider(stub: pb_grpc.GeneratorStub, tiny_model_dir: Path) -> None:
    info = stub.GetModelInfo(pb.GetModelInfoRequest())
    assert info.vocab_size == len(info.vocabulary) == 28 and info.hidden_size == 16 and info.num_layers == 2
    assert info.model_file == "model.onnx" and info.variant == "fp32"
    assert info.execution_provider == "CPUExecutionProvider"
    assert info.max_chars_limit == MAX_CHARS and info.max_sessions == 64


def test_greedy_matches_plain_onnx_runtime_and_pytorch(
    stub: pb_grpc.GeneratorStub, tiny_model_dir: Path, tiny_checkpoint: Path
) -> None:
    text, last = generate(stub, prompt="Whether 'tis", max_chars=200, temperature=0.0)
    assert last.finish_reason == pb.FINISH_REASON_LENGTH and last.generated_chars == len(text)
    assert text == onnx_loop(tiny_model_dir, "Whether 'tis", 200, SamplingSettings(temperature=0.0))
    assert text == torch_greedy(tiny_checkpoint, "Whether 'tis", 200)


def test_greedy_matches_the_pytorch_reference_sampler(stub: pb_grpc.GeneratorStub, tiny_checkpoint: Path) -> None:
    sample = pytest.importorskip("training.sample", reason="the PyTorch reference sampler is not available")
    from training.checkpoint import load_model

    model, vocab, _ = load_model(tiny_checkpoint)
    for prompt in ("The slings and", "O", "Or to take arms"):
        text, _ = generate(stub, prompt=prompt, max_chars=150, temperature=0.0)
        assert text == sample.generate(model, vocab, prompt, 150, temperature=0.0)


def test_seeded_sampling_matches_a_plain_loop(stub: pb_grpc.GeneratorStub, tiny_model_dir: Path) -> None:
    text, _ = generate(stub, prompt="To be", max_chars=200, temperature=0.9, top_k=10, top_p=0.95, seed=3)
    assert text == onnx_loop(tiny_model_dir, "To be", 200, SamplingSettings(0.9, 10, 0.95), seed=3)


def test_two_calls_of_100_equal_one_call_of_200(stub: pb_grpc.GeneratorStub, tiny_model_dir: Path) -> None:
    one = stub.CreateSession(pb.CreateSessionRequest(prompt="Or to", seed=11, temperature=1.0)).session_id
    two = stub.CreateSession(pb.CreateSessionRequest(prompt="Or to", seed=11, temperature=1.0)).session_id
    first, _ = generate(stub, session_id=one, max_chars=100)
    second, _ = generate(stub, session_id=one, max_chars=100)
    whole, _ = generate(stub, session_id=two, max_chars=200)
    assert whole == onnx_loop(tiny_model_dir, "Or to", 200, SamplingSettings(temperature=1.0), seed=11)
    assert first + second == whole
    assert stub.GetSession(pb.GetSessionRequest(session_id=one)).session.consumed_chars == 5 + 200


def test_seeded_text_is_reproducible_while_other_sessions_generate(
    stub: pb_grpc.GeneratorStub, tiny_model_dir: Path
) -> None:
    fields = dict(prompt="The slings", max_chars=300, temperature=0.8, top_k=12, seed=21)
    alone, _ = generate(stub, **fields)
    start = threading.Barrier(7)

    def other(i: int) -> str:
        start.wait()
        return generate(stub, prompt="Or", max_chars=400, temperature=1.0 + i / 10, seed=i)[0]

    def ours() -> str:
        start.wait()
        return generate(stub, **fields)[0]

    with ThreadPoolExecutor(7) as pool:
        others = [pool.submit(other, i) for i in range(6)]
        together = pool.submit(ours).result(timeout=60)
        texts = [f.result(timeout=60) for f in others]
    assert together == alone
    # The others ran their own settings and seeds, undisturbed by ours or each other's.
    assert texts == [onnx_loop(tiny_model_dir, "Or", 400, SamplingSettings(temperature=wire(1.0 + i / 10)), seed=i)
                     for i in range(6)]


def test_cancel_mid_stream_keeps_exactly_the_delivered_text(stub: pb_grpc.GeneratorStub, tiny_model_dir: Path) -> None:
    prompt = "Or to take"
    reference, _ = generate(stub, prompt=prompt, max_chars=3000, temperature=1.0, seed=8)
    session_id = stub.CreateSession(pb.CreateSessionRequest(prompt=prompt, seed=8)).session_id
    call = stub.Generate(pb.GenerateRequest(session_id=session_id, max_chars=3000, temperature=1.0))
    received = ""
    for response in call:
        received += response.text
        if len(received) >= 10:
            call.cancel()
            break
    # The server counts what it handed to the transport (the client may not have read all of it yet).
    for _ in range(100):
        info = stub.GetSession(pb.GetSessionRequest(session_id=session_id)).session
        if not info.busy:
            break
        threading.Event().wait(0.02)
    delivered = info.consumed_chars - len(prompt)
    assert 10 <= delivered < 3000, "the cancel must stop the stream early"
    assert reference.startswith(received)
    # Continuing without a new seed resumes the same stream: the dropped character is resampled.
    rest, _ = generate(stub, session_id=session_id, max_chars=50)
    assert rest == reference[delivered : delivered + 50]
    # With a fresh seed, the continuation equals a plain loop fed exactly the delivered text.
    stub.ResetSession(pb.ResetSessionRequest(session_id=session_id, prompt=prompt + reference[:delivered]))
    fresh, _ = generate(stub, session_id=session_id, max_chars=50, seed=99)
    expected = onnx_loop(tiny_model_dir, prompt + reference[:delivered], 50, SamplingSettings(), seed=99)
    assert fresh == expected


def test_second_generate_on_a_busy_session_is_refused(stub: pb_grpc.GeneratorStub) -> None:
    session_id = stub.CreateSession(pb.CreateSessionRequest(prompt="To")).session_id
    call = stub.Generate(pb.GenerateRequest(session_id=session_id, max_chars=MAX_CHARS))
    next(iter(call))  # the first call is streaming now
    with pytest.raises(grpc.RpcError) as refused:
        generate(stub, session_id=session_id, max_chars=5)
    call.cancel()
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "busy" in refused.value.details()


def test_stop_string_ends_the_call_after_delivering_it(stub: pb_grpc.GeneratorStub) -> None:
    reference, _ = generate(stub, prompt="To be", max_chars=200, temperature=1.0, seed=4)
    stop = reference[50:53]
    text, last = generate(stub, prompt="To be", max_chars=200, temperature=1.0, seed=4, stop=["qqqqqqqq", stop])
    assert text == reference[: reference.index(stop) + 3]
    assert last.finish_reason == pb.FINISH_REASON_STOP and last.matched_stop == stop
    assert last.generated_chars == len(text) and last.prompt_chars == 5


def test_session_lifecycle_rpcs(stub: pb_grpc.GeneratorStub) -> None:
    created = stub.CreateSession(pb.CreateSessionRequest(prompt="Or", temperature=0.5, top_k=3, seed=2))
    session_id = created.session_id
    assert created.session.temperature == 0.5 and created.session.top_k == 3 and created.session.consumed_chars == 2
    first, _ = generate(stub, session_id=session_id, max_chars=40)
    listed = {s.session_id for s in stub.ListSessions(pb.ListSessionsRequest()).sessions}
    assert session_id in listed
    info = stub.ResetSession(pb.ResetSessionRequest(session_id=session_id, prompt="Or", seed=2)).session
    assert info.consumed_chars == 2
    again, _ = generate(stub, session_id=session_id, max_chars=40)
    assert again == first  # reset to the same prompt and seed: the same text
    stub.DeleteSession(pb.DeleteSessionRequest(session_id=session_id))
    with pytest.raises(grpc.RpcError) as gone:
        generate(stub, session_id=session_id, max_chars=5)
    assert gone.value.code() == grpc.StatusCode.NOT_FOUND and "was deleted" in gone.value.details()


BAD_GENERATE = [
    (dict(prompt="To", max_chars=0), "max_chars must be between 1 and"),
    (dict(prompt="To", max_chars=MAX_CHARS + 1), "max_chars must be between 1 and"),
    (dict(prompt="To", max_chars=5, temperature=-0.5), "temperature must be"),
    (dict(prompt="To", max_chars=5, temperature=math.nan), "temperature must be"),
    # A subnormal float32 (found by the fuzzer: a session holding it could not be exported).
    (dict(prompt="To", max_chars=5, temperature=1e-40), "or at least 1.175e-38"),
    (dict(prompt="To", max_chars=5, top_k=-1), "top_k must be >= 0"),
    (dict(prompt="To", max_chars=5, top_p=0.0), "top_p must be in (0, 1]"),
    (dict(prompt="To", max_chars=5, top_p=1.5), "top_p must be in (0, 1]"),
    (dict(prompt="To bÉ!", max_chars=5), "outside the model's vocabulary: 'É', '!'"),
    (dict(prompt="T" * 1001, max_chars=5), "the limit is 1000"),
    (dict(prompt="", max_chars=5), "needs a prompt"),
    (dict(prompt="To", max_chars=5, stop=[""]), "stop strings must not be empty"),
    (dict(prompt="To", max_chars=5, stop=["X"]), "can never match"),
    (dict(session_id="not-an-id", max_chars=5), "malformed"),
]


@pytest.mark.parametrize("fields, message", BAD_GENERATE, ids=[m for _, m in BAD_GENERATE])
def test_bad_generate_requests_are_invalid_argument(stub: pb_grpc.GeneratorStub, fields: dict, message: str) -> None:
    with pytest.raises(grpc.RpcError) as error:
        generate(stub, **fields)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in error.value.details()


def test_session_errors_have_the_right_codes(stub: pb_grpc.GeneratorStub) -> None:
    def code_of(call, request) -> tuple[grpc.StatusCode, str]:
        with pytest.raises(grpc.RpcError) as error:
            result = call(request)
            if not isinstance(result, pb.CreateSessionResponse | pb.GetSessionResponse):
                list(result)
        return error.value.code(), error.value.details()

    unknown = "0123456789abcdef" * 2
    assert code_of(stub.GetSession, pb.GetSessionRequest())[0] == grpc.StatusCode.INVALID_ARGUMENT
    code, details = code_of(stub.GetSession, pb.GetSessionRequest(session_id=unknown))
    assert code == grpc.StatusCode.NOT_FOUND and "not found" in details
    assert code_of(stub.Generate, pb.GenerateRequest(session_id=unknown, max_chars=5))[0] == grpc.StatusCode.NOT_FOUND
    assert code_of(stub.CreateSession, pb.CreateSessionRequest(top_p=2.0))[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(stub.CreateSession, pb.CreateSessionRequest(prompt="~"))[0] == grpc.StatusCode.INVALID_ARGUMENT
    empty = stub.CreateSession(pb.CreateSessionRequest()).session_id
    code, details = code_of(stub.Generate, pb.GenerateRequest(session_id=empty, max_chars=5))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "consumed no text yet" in details


def test_converse_streams_each_turn_like_generate_calls(stub: pb_grpc.GeneratorStub) -> None:
    turns = [
        pb.ConverseRequest(text="To be", max_chars=30, temperature=1.0, seed=4),
        pb.ConverseRequest(text="\nOr", max_chars=20, temperature=0.0),
    ]
    replies: dict[int, str] = {0: "", 1: ""}
    finishes, session_ids = [], set()
    for response in stub.Converse(iter(turns), timeout=60):
        replies[response.turn] += response.text
        session_ids.add(response.session_id)
        if response.finish_reason:
            finishes.append((response.turn, response.finish_reason, response.generated_chars))
    assert finishes == [(0, pb.FINISH_REASON_LENGTH, 30), (1, pb.FINISH_REASON_LENGTH, 20)]
    (session_id,) = session_ids
    session = stub.CreateSession(pb.CreateSessionRequest(seed=4)).session_id
    assert replies[0] == generate(stub, session_id=session, prompt="To be", max_chars=30, temperature=1.0)[0]
    assert replies[1] == generate(stub, session_id=session, prompt="\nOr", max_chars=20, temperature=0.0)[0]
    with pytest.raises(grpc.RpcError) as gone:  # the session lived as long as the stream
        stub.GetSession(pb.GetSessionRequest(session_id=session_id))
    assert gone.value.code() == grpc.StatusCode.NOT_FOUND


def test_converse_rejects_a_bad_turn(stub: pb_grpc.GeneratorStub) -> None:
    with pytest.raises(grpc.RpcError) as error:
        list(stub.Converse(iter([pb.ConverseRequest(text="", max_chars=5)]), timeout=30))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "first turn" in error.value.details()


def test_unexpected_errors_become_internal_and_the_server_goes_on(
    server: BackgroundServer | FrontendsServer, stub: pb_grpc.GeneratorStub, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken() -> list:
        raise KeyError("simulated bug")

    if not isinstance(server, BackgroundServer):
        pytest.skip("patches the servicer in this process; a front-end runs in another")
    assert server.running is not None
    monkeypatch.setattr(server.running.service.store, "sessions", broken)
    with pytest.raises(grpc.RpcError) as error:
        stub.ListSessions(pb.ListSessionsRequest())
    assert error.value.code() == grpc.StatusCode.INTERNAL and "simulated" not in error.value.details()
    monkeypatch.undo()
    assert stub.ListSessions(pb.ListSessionsRequest()).max_sessions == 64
