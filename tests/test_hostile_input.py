"""Requests that are not what the API says: bytes that do not parse as the request
message, and messages bigger than --max-message-bytes. Each gets a status a client can
act on (never UNKNOWN or INTERNAL), is counted in the error metrics, and leaves the
server serving everyone else."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from protos.charstream.v1 import generator_pb2 as pb
from protos.charstream.v1 import generator_pb2_grpc as pb_grpc
from server.background import BackgroundServer
from server.config import ServerConfig
from server.engine.sampling import SamplingSettings
from tests.plain_loop import onnx_loop

SERVICE = "/charstream.v1.Generator/"
MAX_MESSAGE_BYTES = 4096
MAX_CHARS = 40  # bounds the work of a random request that happens to be a valid Generate

# Hand-made wire bytes. Field 1 and field 2 are strings in the messages they are sent to.
BAD_UTF8_FIELD_1 = b"\x0a\x02\xff\xfe"
BAD_UTF8_FIELD_2 = b"\x12\x02\xff\xfe"
TRUNCATED_VARINT = b"\x18\xff\xff"  # field 3, varint, the continuation bit set on the last byte
LENGTH_PAST_END = b"\x0a\x05ab"  # field 1 claims 5 bytes, 2 follow
BAD_WIRE_TYPE = b"\x0f"  # field 1 with wire type 7, which does not exist
FIELD_ZERO = b"\x00\x01"  # field numbers start at 1
GARBAGE = bytes(range(255, 200, -3))

UTF8 = "string fields must be valid UTF-8"
WIRE = "not well-formed protobuf wire format"
CORRUPT = {"truncated_varint": TRUNCATED_VARINT, "length_past_end": LENGTH_PAST_END, "bad_wire_type": BAD_WIRE_TYPE,
           "field_zero": FIELD_ZERO, "garbage": GARBAGE}
# (method, request message, hostile bytes, words the error must contain), by test id
UNARY_CASES = {
    "CreateSession-bad_utf8": ("CreateSession", "CreateSessionRequest", BAD_UTF8_FIELD_1, UTF8),
    **{f"CreateSession-{name}": ("CreateSession", "CreateSessionRequest", data, WIRE) for name, data in CORRUPT.items()},
    "GetSession-bad_utf8": ("GetSession", "GetSessionRequest", BAD_UTF8_FIELD_1, UTF8),
    "GetSession-garbage": ("GetSession", "GetSessionRequest", GARBAGE, WIRE),
    # ImportSession's only field is bytes: any content parses, so only broken wire format is hostile here.
    "ImportSession-length_past_end": ("ImportSession", "ImportSessionRequest", LENGTH_PAST_END, WIRE),
    "ImportSession-garbage": ("ImportSession", "ImportSessionRequest", GARBAGE, WIRE),
}
GENERATE_CASES = {"bad_utf8": (BAD_UTF8_FIELD_2, UTF8), "truncated_varint": (TRUNCATED_VARINT, WIRE),
                  "garbage": (GARBAGE, WIRE)}
ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
           grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.RESOURCE_EXHAUSTED}


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path) -> Iterator[BackgroundServer]:
    config = ServerConfig(model=str(tiny_model_dir), port=0, device="cpu", max_sessions=16, max_chars=MAX_CHARS,
                          max_message_bytes=MAX_MESSAGE_BYTES)
    with BackgroundServer(config) as running:
        yield running


def raw_unary(channel: grpc.Channel, method: str) -> grpc.UnaryUnaryMultiCallable:
    """A call that sends its bytes as they are (no serializer) and returns the reply's bytes."""
    return channel.unary_unary(SERVICE + method, request_serializer=None, response_deserializer=None)


def raw_generate(channel: grpc.Channel, data: bytes) -> list[pb.GenerateResponse]:
    call = channel.unary_stream(SERVICE + "Generate", request_serializer=None,
                                response_deserializer=pb.GenerateResponse.FromString)
    return list(call(data, timeout=30))


def failure(call: object, *args: object) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as error:
        call(*args)  # type: ignore[operator]
    return error.value


def errors_counted(server: BackgroundServer, method: str, code: str) -> float:
    assert server.running is not None
    value = server.running.metrics.registry.get_sample_value(
        "charstream_rpc_errors_total", {"method": method, "code": code})
    return value or 0.0


def assert_still_serving(server: BackgroundServer, channel: grpc.Channel) -> None:
    """Health says SERVING and an ordinary seeded Generate gives exactly its text, to its end."""
    health = health_pb2_grpc.HealthStub(channel)
    status = health.Check(health_pb2.HealthCheckRequest(service="charstream.v1.Generator"), timeout=10).status
    assert status == health_pb2.HealthCheckResponse.SERVING
    request = pb.GenerateRequest(prompt="To", max_chars=10, seed=5)
    responses = list(pb_grpc.GeneratorStub(channel).Generate(request, timeout=30))
    assert "".join(r.text for r in responses) == onnx_loop(server.config.model, "To", 10, SamplingSettings(), seed=5)
    assert responses[-1].finish_reason == pb.FINISH_REASON_LENGTH


@pytest.mark.parametrize(("method", "message", "data", "reason"), UNARY_CASES.values(), ids=UNARY_CASES)
def test_unparseable_unary_requests_are_invalid_argument(
    server: BackgroundServer, channel: grpc.Channel, method: str, message: str, data: bytes, reason: str
) -> None:
    before = errors_counted(server, method, "INVALID_ARGUMENT")
    error = failure(raw_unary(channel, method), data)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = error.details()
    assert f"request is not a valid charstream.v1.{message} message" in details and reason in details
    assert f"({len(data)} bytes received)" in details
    assert errors_counted(server, method, "INVALID_ARGUMENT") == before + 1


@pytest.mark.parametrize(("data", "reason"), GENERATE_CASES.values(), ids=GENERATE_CASES)
def test_unparseable_generate_requests_are_invalid_argument(
    server: BackgroundServer, channel: grpc.Channel, data: bytes, reason: str
) -> None:
    before = errors_counted(server, "Generate", "INVALID_ARGUMENT")
    error = failure(raw_generate, channel, data)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "charstream.v1.GenerateRequest" in error.details() and reason in error.details()
    assert errors_counted(server, "Generate", "INVALID_ARGUMENT") == before + 1
    assert_still_serving(server, channel)


def converse_raw(channel: grpc.Channel, turns: list[bytes]) -> tuple[list[pb.ConverseResponse], grpc.RpcError | None]:
    """Send the turns as raw bytes; the replies that arrived, and the error that ended the call."""
    call = channel.stream_stream(SERVICE + "Converse", request_serializer=None,
                                 response_deserializer=pb.ConverseResponse.FromString)
    replies: list[pb.ConverseResponse] = []
    try:
        for reply in call(iter(turns), timeout=60):
            replies.append(reply)
    except grpc.RpcError as error:
        return replies, error
    return replies, None


def test_a_bad_converse_turn_ends_the_stream_after_the_good_ones(
    server: BackgroundServer, channel: grpc.Channel
) -> None:
    assert server.running is not None
    stub = pb_grpc.GeneratorStub(channel)
    sessions_before = len(server.running.service.store)  # type: ignore[arg-type]
    before = errors_counted(server, "Converse", "INVALID_ARGUMENT")
    good = pb.ConverseRequest(text="To be", max_chars=30, temperature=1.0, seed=4).SerializeToString()
    replies, error = converse_raw(channel, [good, BAD_UTF8_FIELD_1, good])

    assert error is not None and error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "charstream.v1.ConverseRequest" in error.details() and UTF8 in error.details()
    assert {r.turn for r in replies} == {0} and replies[-1].finish_reason == pb.FINISH_REASON_LENGTH
    # The first turn was served exactly as on a clean session with the same seed ...
    session = stub.CreateSession(pb.CreateSessionRequest(seed=4)).session_id
    expected = stub.Generate(pb.GenerateRequest(session_id=session, prompt="To be", max_chars=30, temperature=1.0))
    assert "".join(r.text for r in replies) == "".join(r.text for r in expected)
    stub.DeleteSession(pb.DeleteSessionRequest(session_id=session))
    # ... and the conversation's session went with the stream.
    assert failure(stub.GetSession, pb.GetSessionRequest(session_id=replies[0].session_id)).code() == (
        grpc.StatusCode.NOT_FOUND)
    assert len(server.running.service.store) == sessions_before  # type: ignore[arg-type]
    assert server.running.service.active_streams == 0
    assert errors_counted(server, "Converse", "INVALID_ARGUMENT") == before + 1
    assert_still_serving(server, channel)


@pytest.mark.parametrize("data", [BAD_UTF8_FIELD_1, GARBAGE], ids=["bad_utf8", "garbage"])
def test_a_bad_first_converse_turn_is_invalid_argument(channel: grpc.Channel, data: bytes) -> None:
    replies, error = converse_raw(channel, [data])
    assert replies == [] and error is not None and error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "charstream.v1.ConverseRequest" in error.details()


def test_messages_over_max_message_bytes_are_resource_exhausted(server: BackgroundServer,
                                                                channel: grpc.Channel) -> None:
    stub = pb_grpc.GeneratorStub(channel)
    prompt = "To be " * 1700  # 10,200 characters: over 4096 bytes
    calls = [
        lambda: stub.CreateSession(pb.CreateSessionRequest(prompt=prompt), timeout=30),
        lambda: list(stub.Generate(pb.GenerateRequest(prompt=prompt, max_chars=5), timeout=30)),
        lambda: list(stub.Converse(iter([pb.ConverseRequest(text=prompt, max_chars=5)]), timeout=30)),
        lambda: raw_unary(channel, "GetSession")(b"\xff" * 10_000, timeout=30),  # too big is checked before parsing
    ]
    for call in calls:
        error = failure(call)
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error
    assert_still_serving(server, channel)


def mutated(base: bytes, position: int, value: int, keep: int) -> bytes:
    """`base` with one byte replaced, then cut to `keep` bytes: almost a valid message."""
    data = bytearray(base)
    data[position % len(data)] = value
    return bytes(data[:keep])


VALID = [
    pb.CreateSessionRequest(prompt="To be", temperature=0.5, top_k=3, seed=7).SerializeToString(),
    pb.GenerateRequest(prompt="To be", max_chars=5, temperature=0.5, stop=["be"]).SerializeToString(),
]
HOSTILE_BYTES = st.one_of(
    st.binary(max_size=80),
    st.builds(mutated, st.sampled_from(VALID), st.integers(0, 100), st.integers(0, 255), st.integers(0, 40)),
)


def code_of(call: object) -> grpc.StatusCode:
    try:
        call()  # type: ignore[operator]
    except grpc.RpcError as error:
        return error.code()
    return grpc.StatusCode.OK


@hypothesis_settings(max_examples=300, deadline=None, database=None)
@given(data=HOSTILE_BYTES)
def test_random_bytes_never_get_unknown_or_internal(server: BackgroundServer, channel: grpc.Channel,
                                                   data: bytes) -> None:
    stub = pb_grpc.GeneratorStub(channel)
    created: list[bytes] = []
    create = raw_unary(channel, "CreateSession")
    codes = {
        code_of(lambda: created.append(create(data, timeout=30))),
        code_of(lambda: raw_generate(channel, data)),
    }
    assert codes <= ALLOWED, (data, codes)
    for reply in created:  # bytes that were a valid request made a session: keep the store small
        stub.DeleteSession(pb.DeleteSessionRequest(session_id=pb.CreateSessionResponse.FromString(reply).session_id))
    health = health_pb2_grpc.HealthStub(channel)
    status = health.Check(health_pb2.HealthCheckRequest(service="charstream.v1.Generator"), timeout=10).status
    assert status == health_pb2.HealthCheckResponse.SERVING


def test_the_server_still_serves_after_the_hostile_requests(server: BackgroundServer, channel: grpc.Channel) -> None:
    assert server.running is not None
    assert errors_counted(server, "CreateSession", "UNKNOWN") == 0
    assert errors_counted(server, "CreateSession", "INTERNAL") == 0
    assert errors_counted(server, "Generate", "INTERNAL") == 0
    assert server.running.service.active_streams == 0
    assert_still_serving(server, channel)
