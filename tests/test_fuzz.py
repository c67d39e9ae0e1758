"""Thousands of random calls of every Generator RPC, as two API keys (and as no key, an unknown
key, a key without its scheme), on one live server with TLS: real, random and garbage session ids,
prompts in and out of the vocabulary, out-of-range sampling values, stop strings, real, damaged and
edge-of-range session records, conversations, cancelled and concurrent streams. Every answer must be
OK or a documented status, and no key sees another's sessions. Meanwhile a third key replays a seeded
script whose text must stay what it was before the traffic began. -s prints a per-RPC summary.
"""

from __future__ import annotations

import collections
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from protos.charstream.v1 import generator_pb2 as pb
from protos.charstream.v1 import generator_pb2_grpc as pb_grpc
from server.background import BackgroundServer
from server.clients.client import tls_credentials
from server.config import ServerConfig
from server.engine.sampling import SamplingSettings
from tests.fuzz_inputs import (
    GARBAGE_IDS,
    HEX_IDS,
    INDEX,
    PROMPTS,
    SAMPLING,
    SEEDS,
    TURN,
    VOCAB_TEXT,
    VOCABULARY,
    damaged,
)
from tests.plain_loop import onnx_loop
from tests.tls_certs import make_pki

SECRETS = {"alice": "alice-secret-0123456789", "bob": "bob-secret-9876543210xyz", "carol": "carol-secret-5555555555"}
FUZZ_KEYS = ("alice", "bob")  # carol runs the seeded script
# Callers without a valid key: every answer to them must be UNAUTHENTICATED.
STRANGERS = {"none": None, "wrong": (("authorization", "Bearer wrong-secret-0123456789"),),
             "no-scheme": (("authorization", SECRETS["alice"]),)}
CALLERS = [*FUZZ_KEYS * 9, *STRANGERS]
Code = grpc.StatusCode
DOCUMENTED = {Code.OK, Code.INVALID_ARGUMENT, Code.NOT_FOUND, Code.FAILED_PRECONDITION, Code.RESOURCE_EXHAUSTED,
              Code.UNAVAILABLE, Code.ABORTED, Code.UNAUTHENTICATED}
# Another key's session: argument checks and the stream quota come before the lookup, nothing else may.
FOREIGN = {Code.NOT_FOUND, Code.INVALID_ARGUMENT, Code.RESOURCE_EXHAUSTED}
TIMEOUT = 10.0  # a hang shows up as DEADLINE_EXCEEDED, which is not documented
MAX_CHARS, SESSIONS_PER_KEY, MIN_CALLS = 200, 8, 1500
SEED_PROMPT, SEED, SEED_CALLS, SEED_CHARS = "To be, or not", 20240611, 6, 40


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackgroundServer]:
    directory = tmp_path_factory.mktemp("fuzz")
    pki, keys = make_pki(directory / "pki"), directory / "keys.txt"
    keys.write_text("".join(f"{name}:{secret}\n" for name, secret in SECRETS.items()))
    config = ServerConfig(model=str(tiny_model_dir), port=0, device="cpu", max_sessions=32, max_chars=MAX_CHARS,
                          max_prompt_chars=200, tls_cert=str(pki.server.cert_path), tls_key=str(pki.server.key_path),
                          api_keys=str(keys), max_sessions_per_key=SESSIONS_PER_KEY, max_streams_per_key=4,
                          log_level="error")
    with BackgroundServer(config) as running:
        running.ca_path = str(pki.ca.cert_path)  # type: ignore[attr-defined]
        yield running


def metadata(who: str) -> tuple[tuple[str, str], ...] | None:
    return STRANGERS[who] if who in STRANGERS else (("authorization", f"Bearer {SECRETS[who]}"),)


def message(kind: Any, **fields: Any) -> Any:
    """A request with the fields that are not None (None leaves an optional field unset)."""
    return kind(**{name: value for name, value in fields.items() if value is not None})


class Fuzzer:
    """The traffic's shared state: sessions seen (with owners), records exported, a tally, the first failure."""

    def __init__(self, channel: grpc.Channel):
        self.stub = pb_grpc.GeneratorStub(channel)
        self.lock = threading.Lock()
        self.owners: dict[str, str] = {}
        self.recent: collections.deque[str] = collections.deque(maxlen=24)  # drawn from; gone ones too
        self.seeded = ""  # the seeded script's session: the fuzzing keys try everything on it
        self.records: collections.deque[bytes] = collections.deque(maxlen=16)
        self.tally: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
        self.cancelled = self.edges = 0  # edges: which of EDGES the next edge-of-range record gets
        # Failures are not raised inside the search: its replays would meet a server in another state.
        # After the first, calls are skipped (the server may hang) but the draws go on unchanged.
        self.failure = ""

    def check(self, ok: bool, problem: str) -> None:
        self.failure = self.failure or ("" if ok else problem)

    def adopt(self, session_id: str, owner: str) -> None:
        with self.lock:
            self.owners[session_id] = owner
            if owner in FUZZ_KEYS:
                self.recent.append(session_id)
            else:
                self.seeded = session_id

    def session_id(self, data: st.DataObject) -> str:
        """A real id (any key's, live or gone), the seeded session's, a random well-formed one, or garbage."""
        kind, at, random_id, garbage = (data.draw(st.integers(0, 6)), data.draw(INDEX), data.draw(HEX_IDS),
                                        data.draw(GARBAGE_IDS))
        with self.lock:
            known, seeded = list(self.recent), self.seeded
        if kind < 4 and known:
            return known[at % len(known)]
        return seeded if kind == 4 and seeded else random_id if kind == 5 else garbage

    def call(self, rpc: str, who: str, invoke: Callable[[Any], Any], subject: str = "") -> tuple[Code, Any]:
        """One call as `who` about `subject` (a session id, or what was sent); its status must be
        documented and right for the caller."""
        if self.failure:
            return Code.CANCELLED, None
        try:
            result, code, details = invoke(metadata(who)), Code.OK, ""
        except grpc.RpcError as error:
            result, code, details = None, error.code(), error.details()
        self.tally[rpc][code.name] += 1
        where = f"{rpc} as {who} on {subject!r}: {code.name} {details}"
        self.check(code in DOCUMENTED, f"undocumented status: {where}")
        self.check((code == Code.UNAUTHENTICATED) == (who in STRANGERS), f"wrong authentication: {where}")
        foreign = who not in STRANGERS and self.owners.get(subject, who) != who
        self.check(not foreign or code in FOREIGN, f"another key's session answered: {where}")
        return code, result

    def unary(self, rpc: str, who: str, request: Any, subject: str) -> tuple[Code, Any]:
        return self.call(rpc, who, lambda md: getattr(self.stub, rpc)(request, metadata=md, timeout=TIMEOUT), subject)


def unary(rpc: str, kind: Any, **fields: st.SearchStrategy[Any]) -> Callable[[Fuzzer, st.DataObject, str], None]:
    """An operation calling the unary `rpc` with `fields` drawn (and a session id, if it takes one);
    then bookkeeping and checks, without draws (they would depend on the server's answers)."""
    def operation(fuzz: Fuzzer, data: st.DataObject, who: str) -> None:
        values = {name: data.draw(strategy) for name, strategy in fields.items()}
        if "session_id" in kind.DESCRIPTOR.fields_by_name:
            values["session_id"] = fuzz.session_id(data)
        subject = values.get("session_id", "")
        if rpc == "ImportSession":
            subject, values["state"] = import_state(fuzz, data)
        request = message(kind, **values)
        code, reply = fuzz.unary(rpc, who, request, subject)
        if code != Code.OK:
            return
        if rpc in ("CreateSession", "ForkSession", "ImportSession"):
            fuzz.adopt(reply.session_id, who)
        if rpc == "ExportSession":
            fuzz.records.append(reply.state)
        if rpc == "ListSessions":
            shown = [info.session_id for info in reply.sessions if fuzz.owners.get(info.session_id, who) != who]
            fuzz.check(not shown and len(reply.sessions) <= SESSIONS_PER_KEY, f"{who} was shown {shown}")
        if rpc == "ImportSession":  # use it: a record may hold values the server trips on later
            sid, about = reply.session_id, f"{reply.session_id} from {subject}"
            fuzz.call("Generate", who, lambda md: list(fuzz.stub.Generate(pb.GenerateRequest(
                session_id=sid, max_chars=3, temperature=1.0), metadata=md, timeout=TIMEOUT)), about)
            fuzz.unary("GetSession", who, pb.GetSessionRequest(session_id=sid), about)
            fuzz.unary("ListSessions", who, pb.ListSessionsRequest(), about)
            fuzz.unary("ExportSession", who, pb.ExportSessionRequest(session_id=sid), about)
    return operation


def import_state(fuzz: Fuzzer, data: st.DataObject) -> tuple[str, bytes]:
    kind, at, noise = data.draw(st.integers(0, 15)), data.draw(INDEX), data.draw(st.binary(max_size=200))
    records = list(fuzz.records)
    state, done = damaged(data, records[at % len(records)] if records else None, fuzz.edges)  # drawn even if unused
    fuzz.edges += "edge value" in done
    if not (kind < 11 and records):
        state = b"\0" * (1 << 20 | 1) if kind == 13 else noise if kind < 13 else b"CSREC\x01\x00" + noise[:40]
        done = f"{len(state)} bytes starting {state[:12]!r}"
    return done, state


def generate(fuzz: Fuzzer, data: st.DataObject, who: str) -> None:
    session_id = "" if data.draw(st.integers(0, 3)) == 0 else fuzz.session_id(data)
    turn = {"prompt" if name == "text" else name: data.draw(strategy) for name, strategy in TURN.items()}
    request = message(pb.GenerateRequest, session_id=session_id, **turn)
    cancel = data.draw(st.integers(0, 4)) == 0

    def run(md: Any) -> list[pb.GenerateResponse]:
        call, received = fuzz.stub.Generate(request, metadata=md, timeout=TIMEOUT), []
        for response in call:
            received.append(response)
            if cancel:  # the session keeps what was handed over
                fuzz.cancelled += 1
                call.cancel()
                break
        return received

    code, received = fuzz.call("Generate", who, run, session_id)
    if code == Code.OK and not cancel:
        last, text = received[-1], "".join(r.text for r in received)
        fuzz.check(last.generated_chars == len(text) <= request.max_chars and last.prompt_chars == len(request.prompt)
                   and (last.finish_reason == pb.FINISH_REASON_LENGTH or last.matched_stop in request.stop
                        and text.endswith(last.matched_stop)), f"Generate ended with {last} after {text!r}")


def converse(fuzz: Fuzzer, data: st.DataObject, who: str) -> None:
    turns = [message(pb.ConverseRequest, **{name: data.draw(strategy) for name, strategy in TURN.items()})
             for _ in range(data.draw(st.integers(0, 3)))]
    fuzz.call("Converse", who, lambda md: list(fuzz.stub.Converse(iter(turns), metadata=md, timeout=TIMEOUT)))


def hold(fuzz: Fuzzer, data: st.DataObject, who: str) -> None:
    """Open 1-5 streams of one key (its quota is 4), then make other calls while they run."""
    streams: list[Any] = []
    for _ in range(data.draw(st.integers(1, 5))):
        session_id = "" if data.draw(st.integers(0, 3)) == 0 else fuzz.session_id(data)
        request = pb.GenerateRequest(session_id=session_id, prompt=data.draw(VOCAB_TEXT) or "To",
                                     max_chars=MAX_CHARS)

        def opened(md: Any) -> pb.GenerateResponse:
            streams.append(fuzz.stub.Generate(request, metadata=md, timeout=TIMEOUT))
            return next(streams[-1])  # the first message: the stream runs
        fuzz.call("Generate", who, opened, session_id)
    try:
        for _ in range(data.draw(st.integers(1, 3))):
            data.draw(st.sampled_from(OPERATIONS))(fuzz, data, data.draw(st.sampled_from([who, who, *CALLERS])))
    finally:
        for call in streams:
            call.cancel()


OPERATIONS: list[Callable[[Fuzzer, st.DataObject, str], None]] = [
    generate, generate, generate, converse,
    unary("CreateSession", pb.CreateSessionRequest, prompt=PROMPTS, **SAMPLING),
    unary("ImportSession", pb.ImportSessionRequest), unary("ImportSession", pb.ImportSessionRequest),
    unary("GetModelInfo", pb.GetModelInfoRequest), unary("ListSessions", pb.ListSessionsRequest),
    unary("GetSession", pb.GetSessionRequest), unary("DeleteSession", pb.DeleteSessionRequest),
    unary("ResetSession", pb.ResetSessionRequest, prompt=PROMPTS, seed=SEEDS),
    unary("ForkSession", pb.ForkSessionRequest), unary("ExportSession", pb.ExportSessionRequest),
]


def seeded_text(stub: pb_grpc.GeneratorStub, adopt: Callable[[str], None] = lambda session_id: None) -> str:
    """The fixed script: a seeded session at temperature 0.9, continued SEED_CALLS times, deleted."""
    md = metadata("carol")
    request = pb.CreateSessionRequest(prompt=SEED_PROMPT, seed=SEED, temperature=0.9)
    session_id = stub.CreateSession(request, metadata=md, timeout=TIMEOUT).session_id
    adopt(session_id)
    text = "".join(r.text for _ in range(SEED_CALLS) for r in stub.Generate(
        pb.GenerateRequest(session_id=session_id, max_chars=SEED_CHARS), metadata=md, timeout=TIMEOUT))
    stub.DeleteSession(pb.DeleteSessionRequest(session_id=session_id), metadata=md, timeout=TIMEOUT)
    return text


def test_random_traffic_gets_documented_statuses_and_never_crosses_keys(server: BackgroundServer) -> None:
    started = time.monotonic()
    channel = grpc.secure_channel(server.address, tls_credentials(server.ca_path))  # type: ignore[attr-defined]
    stub = pb_grpc.GeneratorStub(channel)
    fuzz = Fuzzer(channel)
    assert "".join(stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=metadata("alice")).vocabulary) == VOCABULARY
    reference = seeded_text(stub)  # before any other traffic
    done, replays = threading.Event(), []

    def replay() -> None:
        try:
            while not done.is_set() and not fuzz.failure:
                replays.append(seeded_text(stub, lambda session_id: fuzz.adopt(session_id, "carol")) == reference)
        except grpc.RpcError as error:
            fuzz.check(False, f"the seeded script failed: {error.code().name} {error.details()}")

    @settings(max_examples=150, deadline=None, database=None, phases=(Phase.explicit, Phase.generate),
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(data=st.data())
    def traffic(data: st.DataObject) -> None:
        for _ in range(data.draw(st.integers(8, 16))):
            data.draw(st.sampled_from([*OPERATIONS, hold]))(fuzz, data, data.draw(st.sampled_from(CALLERS)))

    thread = threading.Thread(target=replay, name="seeded-replay", daemon=True)
    thread.start()
    try:
        traffic()
    finally:
        done.set()
        thread.join(timeout=60)
        total = sum(sum(codes.values()) for codes in fuzz.tally.values())
        print(f"\nfuzz: {total} calls in {time.monotonic() - started:.1f} s; {replays.count(True)} of {len(replays)} "
              f"seeded replays equal; {fuzz.cancelled} Generate calls cancelled after their first message")
        for rpc in sorted(fuzz.tally):
            print(f"  {rpc:14} {sum(fuzz.tally[rpc].values()):5}  {dict(fuzz.tally[rpc].most_common())}")
    assert not fuzz.failure, fuzz.failure
    assert replays and all(replays), f"seeded text changed under other traffic in {replays.count(False)} replays"
    health = health_pb2_grpc.HealthStub(channel)  # no key needed
    for service in ("", "charstream.v1.Generator"):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    final = list(stub.Generate(pb.GenerateRequest(prompt="To be", max_chars=20, seed=1), metadata=metadata("bob"),
                               timeout=TIMEOUT))
    assert "".join(r.text for r in final) == onnx_loop(server.config.model, "To be", 20, SamplingSettings(), seed=1)
    assert final[-1].finish_reason == pb.FINISH_REASON_LENGTH
    channel.close()
    assert total >= MIN_CALLS
