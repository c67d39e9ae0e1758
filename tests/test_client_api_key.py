"""The client library sends its API key (as `authorization: Bearer ...`) with unary, server-streaming,
bidirectional and client-streaming calls, checked on a stand-in Generator that notes what it got;
and refuses a key that cannot be sent as metadata."""

from __future__ import annotations

import queue
from concurrent import futures
from typing import Iterator

import grpc
import pytest

from protos.charstream.v1 import generator_pb2 as pb
from protos.charstream.v1 import generator_pb2_grpc as pb_grpc
from server.clients.client import CharstreamClient


class RecordingGenerator(pb_grpc.GeneratorServicer):
    """Answers a few calls with canned replies, noting the authorization metadata of each."""

    def __init__(self) -> None:
        self.seen: queue.Queue[tuple[str, str | None]] = queue.Queue()

    def _note(self, method: str, context: grpc.ServicerContext) -> None:
        self.seen.put((method, dict(context.invocation_metadata()).get("authorization")))

    def CreateSession(self, request, context):  # noqa: N802 - gRPC's method names
        self._note("CreateSession", context)
        return pb.CreateSessionResponse(session_id="s1")

    def DeleteSession(self, request, context):  # noqa: N802
        self._note("DeleteSession", context)
        return pb.DeleteSessionResponse()

    def Generate(self, request, context):  # noqa: N802
        self._note("Generate", context)
        yield pb.GenerateResponse(text="ab", finish_reason=pb.FINISH_REASON_LENGTH, generated_chars=2)

    def Converse(self, request_iterator, context):  # noqa: N802
        self._note("Converse", context)
        for _ in request_iterator:
            yield pb.ConverseResponse(session_id="c1", text="x", finish_reason=pb.FINISH_REASON_LENGTH)


def _upload(requests, context: grpc.ServicerContext) -> bytes:
    """A client-streaming method (the Generator service has none) to cover that kind of call."""
    return dict(context.invocation_metadata()).get("authorization", "").encode() + b"|" + b"".join(requests)


@pytest.fixture
def recording_server() -> Iterator[tuple[str, RecordingGenerator]]:
    recorder = RecordingGenerator()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_GeneratorServicer_to_server(recorder, server)
    upload = grpc.stream_unary_rpc_method_handler(_upload)
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("test.Probe", {"Upload": upload})])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}", recorder
    finally:
        server.stop(grace=None)


def test_the_api_key_goes_with_unary_and_streaming_calls(recording_server: tuple[str, RecordingGenerator]) -> None:
    address, recorder = recording_server
    with CharstreamClient(address, timeout=10, api_key="X") as client:
        session = client.create_session()
        assert session.generate(max_chars=2).text() == "ab"
        session.delete()
        conversation = client.conversation()
        assert "".join(conversation.say("hi")) == "x"
        conversation.close()
        upload = client.channel.stream_unary("/test.Probe/Upload")
        assert upload(iter([b"a", b"b"]), timeout=10) == b"Bearer X|ab"
    seen = [recorder.seen.get_nowait() for _ in range(recorder.seen.qsize())]
    assert sorted(seen) == sorted((method, "Bearer X") for method in
                                  ("CreateSession", "Generate", "DeleteSession", "Converse"))
    with pytest.raises(ValueError, match="API key"):
        CharstreamClient(address, api_key="two\nlines")
