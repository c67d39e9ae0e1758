"""Every error the HTTP port can give, on real servers: each gRPC code's HTTP status with the
gRPC message, malformed and oversized bodies (400 or 413, never 500), aiohttp's own refusals
in the API's error shape, and the documented mapping table."""

from __future__ import annotations

import json
import random
import re
import socket
import time
from pathlib import Path
from typing import Iterator

import grpc
import pytest

from protos.charstream.v1 import generator_pb2 as pb
from server.api.errors import ServiceError
from server.background import BackgroundServer
from server.clients.client import CharstreamClient
from server.config import ServerConfig
from server.http.errors import HTTP_STATUS
from tests.http_client import Http, abort_connection, read_events

REPO_ROOT = Path(__file__).resolve().parents[1]
LIMIT = 4096  # --max-message-bytes (its minimum)


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path) -> Iterator[BackgroundServer]:
    config = ServerConfig(model=str(tiny_model_dir), port=0, http_port=0, device="cpu", max_sessions=3,
                          max_chars=100_000, max_message_bytes=LIMIT)
    with BackgroundServer(config) as running:
        yield running


@pytest.fixture(scope="module")
def http(server: BackgroundServer) -> Http:
    return Http.of(server)


def grpc_error(server: BackgroundServer, call) -> tuple[str, str]:  # type: ignore[no-untyped-def]
    with CharstreamClient(server.address) as client:
        with pytest.raises(grpc.RpcError) as failure:
            call(client)
    return failure.value.code().name, failure.value.details()


def test_invalid_arguments_are_400_with_the_grpc_message(server: BackgroundServer, http: Http) -> None:
    cases = [
        ({"prompt": "To be", "max_chars": 5, "temperature": -1}, lambda c: c.generate("To be", 5, temperature=-1).text()),
        ({"prompt": "To be", "max_chars": 0}, lambda c: c.generate("To be", 0).text()),
        ({"prompt": "To be", "max_chars": 5, "top_p": 0}, lambda c: c.generate("To be", 5, top_p=0).text()),
        ({"prompt": "Zebra€", "max_chars": 5}, lambda c: c.generate("Zebra€", 5).text()),
        ({"max_chars": 5}, lambda c: c.generate("", 5).text()),
        ({"prompt": "To be", "max_chars": 5, "stop": [""]}, lambda c: c.generate("To be", 5, stop=[""]).text()),
        ({"session_id": "nope", "max_chars": 5}, lambda c: c.generate("", 5, session_id="nope").text()),
    ]
    for body, grpc_call in cases:
        for stream in (False, True):
            reply = http.call("POST", "/v1/generate", {**body, "stream": stream})
            assert reply.status == 400, (body, reply.body)
            assert (reply.error["code"], reply.error["message"]) == grpc_error(server, grpc_call), body


def test_not_found_and_failed_precondition(server: BackgroundServer, http: Http) -> None:
    unknown = "f" * 32
    reply = http.call("GET", f"/v1/sessions/{unknown}")
    assert reply.status == 404
    assert (reply.error["code"], reply.error["message"]) == grpc_error(server, lambda c: c.session(unknown).info())

    empty = http.call("POST", "/v1/sessions").json()["session_id"]  # no body at all: every field unset
    no_text = http.call("POST", "/v1/generate", {"session_id": empty, "max_chars": 5})
    assert no_text.status == 409 and no_text.error["code"] == "FAILED_PRECONDITION"
    assert "consumed no text" in no_text.error["message"]

    busy_id = http.call("POST", "/v1/sessions", {"prompt": "To be"}).json()["session_id"]
    connection, response = http.open_stream({"session_id": busy_id, "max_chars": 100_000})
    try:
        next(read_events(response))
        for method, path, body in (("POST", "/v1/generate", {"session_id": busy_id, "max_chars": 5}),
                                   ("POST", f"/v1/sessions/{busy_id}:fork", None),
                                   ("POST", f"/v1/sessions/{busy_id}:reset", {}),
                                   ("DELETE", f"/v1/sessions/{busy_id}", None)):
            busy = http.call(method, path, body)
            assert busy.status == 409 and busy.error["code"] == "FAILED_PRECONDITION", (path, busy.body)
            assert busy_id in busy.error["message"]
    finally:
        abort_connection(connection, response)
    wait_idle(http, busy_id)
    for session_id in (empty, busy_id):
        assert http.call("DELETE", f"/v1/sessions/{session_id}").status == 200


def wait_idle(http: Http, session_id: str) -> None:
    deadline = time.monotonic() + 10
    while http.call("GET", f"/v1/sessions/{session_id}").json()["session"]["busy"]:
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_every_session_busy_is_429(http: Http) -> None:
    streams = [http.open_stream({"prompt": "To be", "max_chars": 100_000}) for _ in range(3)]  # --max-sessions 3
    try:
        for _, response in streams:
            next(read_events(response))
        full = http.call("POST", "/v1/sessions", {"prompt": "To be"})
        assert full.status == 429 and full.error["code"] == "RESOURCE_EXHAUSTED"
    finally:
        for connection, response in streams:
            abort_connection(connection, response)


def test_an_unexpected_failure_is_500_without_internals(server: BackgroundServer, http: Http) -> None:
    service = server.running.service  # type: ignore[union-attr]
    kept = service.model_info
    service.model_info = object()  # not a message: converting it fails where no ServiceError is made
    try:
        reply = http.call("GET", "/v1/model")
    finally:
        service.model_info = kept
    assert reply.status == 500 and reply.error == {
        "code": "INTERNAL", "message": "internal error in GetModelInfo; the server log has details"}


def test_an_unreachable_shared_store_is_503_and_not_ready(tiny_model_dir: Path) -> None:
    pytest.importorskip("redis")
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = ServerConfig(model=str(tiny_model_dir), port=0, http_port=0, device="cpu", max_sessions=4,
                          session_store=f"redis://127.0.0.1:{port}/0")
    with BackgroundServer(config) as server:
        http = Http.of(server)
        reply = http.call("POST", "/v1/sessions", {"prompt": "To be"})
        assert reply.status == 503 and reply.error["code"] == "UNAVAILABLE"
        assert f"127.0.0.1:{port}" in reply.error["message"]
        deadline = time.monotonic() + 15
        while (ready := http.call("GET", "/readyz")).status == 200:
            assert time.monotonic() < deadline, "readyz kept saying SERVING without its store"
            time.sleep(0.1)
        assert (ready.status, ready.json()) == (503, {"status": "NOT_SERVING"})
        assert http.call("GET", "/healthz").status == 200  # the process itself is alive


MALFORMED = [
    b"{bad json", b"[1, 2]", b'"a string"', b"42", b"null", b"\xff\xfe not utf-8", b"[" * 2000 + b"]" * 2000,
    b'{"bogus": 1}', b'{"max_chars": "many"}', b'{"max_chars": 1.5}', b'{"max_chars": 99999999999999}',
    b'{"prompt": 7}', b'{"stop": "e"}', b'{"stop": [1]}', b'{"temperature": "hot"}', b'{"temperature": NaN}',
    b'{"temperature": Infinity}', b'{"seed": -1}', b'{"seed": "x"}', b'{"prompt": {"nested": 1}}',
    b'{"prompt": "\\ud800"}', b'{"stream": "yes"}', b'{"session_id": 5}',
]


@pytest.mark.parametrize("body", MALFORMED, ids=[repr(b[:24]) for b in MALFORMED])
def test_malformed_bodies_are_400_never_500(http: Http, body: bytes) -> None:
    for path in ("/v1/generate", "/v1/sessions", f"/v1/sessions/{'a' * 32}:reset"):
        reply = http.call("POST", path, body, headers={"Content-Type": "application/json"})
        assert reply.status == 400, (path, reply.status, reply.body)
        assert reply.error["code"] == "INVALID_ARGUMENT"


def test_random_bodies_on_every_post_route_never_give_500(http: Http) -> None:
    generator = random.Random(24)
    paths = ["/v1/generate", "/v1/sessions", "/v1/sessions:import", f"/v1/sessions/{'b' * 32}:reset",
             f"/v1/sessions/{'b' * 32}:fork", f"/v1/sessions/{'b' * 32}:export"]
    pieces = [b"{", b"}", b"[", b"]", b'"', b":", b",", b"\\", b"\x00", b"\xc3", b"max_chars", b"prompt", b"1e999",
              b"-0", b"true", b"null", b"\n"]
    for _ in range(150):
        body = b"".join(generator.choice(pieces) for _ in range(generator.randrange(0, 40)))
        if generator.random() < 0.3:
            body = bytes(generator.randrange(256) for _ in range(generator.randrange(0, 200)))
        path = generator.choice(paths)
        headers = {"Content-Type": generator.choice(["application/json", "application/octet-stream", "text/plain"])}
        reply = http.call("POST", path, body, headers=headers)
        assert reply.status in (200, 400, 404, 409, 413), (path, body, headers, reply.status, reply.body)
        if reply.status != 200:
            assert reply.error["code"] in ("INVALID_ARGUMENT", "NOT_FOUND", "FAILED_PRECONDITION")


def test_a_gzip_body_that_does_not_decompress_is_400(http: Http) -> None:
    """aiohttp decompresses a body as it reads it: one it cannot is the client's mistake, not INTERNAL."""
    reply = http.call("POST", "/v1/sessions", b"abcde", headers={"Content-Encoding": "gzip"})
    assert reply.status == 400 and reply.error["code"] == "INVALID_ARGUMENT", (reply.status, reply.body)
    assert "could not be read" in reply.error["message"]


def test_bodies_over_the_message_limit_are_413(http: Http) -> None:
    big = json.dumps({"prompt": "T" * LIMIT, "max_chars": 5}).encode()
    for path in ("/v1/generate", "/v1/sessions", "/v1/sessions:import"):
        reply = http.call("POST", path, big)
        assert reply.status == 413 and reply.error["code"] == "RESOURCE_EXHAUSTED", path
        assert f"{LIMIT} bytes (--max-message-bytes)" in reply.error["message"]
    # Without a Content-Length (chunked): refused while it is read.
    connection = http.connection()
    try:
        connection.request("POST", "/v1/generate", body=iter([big[:2000], big[2000:]]), encode_chunked=True,
                           headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        assert response.status == 413 and json.loads(response.read())["error"]["code"] == "RESOURCE_EXHAUSTED"
    finally:
        connection.close()
    assert http.call("POST", "/v1/generate", {"prompt": "T" * 100, "max_chars": 5}).status == 200  # under: fine


def test_record_errors_and_path_errors(http: Http) -> None:
    for body in (b"", b"not a record", b"\x00" * 64):
        reply = http.call("POST", "/v1/sessions:import", body, headers={"Content-Type": "application/octet-stream"})
        assert reply.status == 400 and reply.error["code"] == "INVALID_ARGUMENT", body
    bad_base64 = http.call("POST", "/v1/sessions:import", {"state": "***"})
    assert bad_base64.status == 400
    in_both = http.call("POST", f"/v1/sessions/{'c' * 32}:reset", {"session_id": "c" * 32})
    assert in_both.status == 400 and "comes from the path" in in_both.error["message"]
    malformed_id = http.call("GET", "/v1/sessions/NOT-HEX")
    assert malformed_id.status == 400 and "32 lowercase hex digits" in malformed_id.error["message"]
    no_route = http.call("GET", "/v2/anything")
    assert no_route.status == 404 and no_route.error["code"] == "NOT_FOUND"
    no_action = http.call("POST", f"/v1/sessions/{'c' * 32}:explode")
    assert no_action.status == 404 and ":fork" in no_action.error["message"]
    wrong_method = http.call("PUT", "/v1/generate", {})
    assert wrong_method.status == 405 and wrong_method.error["code"] == "UNIMPLEMENTED"
    assert "POST" in wrong_method.error["message"]


def test_every_grpc_code_has_a_status_and_the_docs_table_says_the_same() -> None:
    assert set(HTTP_STATUS) == set(grpc.StatusCode) - {grpc.StatusCode.OK}
    assert HTTP_STATUS[grpc.StatusCode.FAILED_PRECONDITION] == 409
    text = (REPO_ROOT / "docs" / "http.md").read_text()
    documented = {code: int(status) for code, status in re.findall(r"^\| `([A-Z_]+)` \| (\d{3}) \|", text, re.MULTILINE)}
    assert documented == {code.name: status for code, status in HTTP_STATUS.items()}


def test_the_proto_has_no_field_the_json_mapping_cannot_carry() -> None:
    # Every request message parses from the JSON that its own reply-side printer writes.
    from google.protobuf import json_format

    from server.http.codec import to_json, to_message

    message = pb.GenerateRequest(session_id="a" * 32, prompt="To be", max_chars=5, temperature=0.0, seed=2**64 - 1,
                                 stop=["\n"])
    assert to_message(to_json(message), pb.GenerateRequest()) == message
    assert json_format.MessageToDict(message)["seed"] == str(2**64 - 1)  # the proto mapping itself quotes it
    assert to_json(message)["seed"] == str(2**64 - 1)  # too big for a double: kept as a string


class _FailsAfterTheLastMessage:
    """A servicer whose Generate writes two messages, the last with its finish fields, then fails
    (as a shared store's final write-back can): what a client reads must still parse."""

    async def Generate(self, request, sink) -> None:
        await sink.write(pb.GenerateResponse(text="ab"))
        await sink.write(pb.GenerateResponse(text="c", finish_reason=pb.FINISH_REASON_LENGTH, generated_chars=3))
        raise ServiceError(grpc.StatusCode.UNAVAILABLE, "the session store at redis://x is unreachable")


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_a_failure_after_the_last_message_still_parses(stream: bool) -> None:
    import asyncio

    from aiohttp import web
    from aiohttp.test_utils import TestClient, TestServer

    from server.http.calls import Calls
    from server.http.generate import generate
    from server.metrics import ServerMetrics

    calls = Calls(_FailsAfterTheLastMessage(), None, None, ServerMetrics(), 1 << 20)  # type: ignore[arg-type]

    async def handler(request: web.Request) -> web.StreamResponse:
        return await generate(request, calls)

    async def run() -> str:
        app = web.Application()
        app.router.add_post("/v1/generate", handler)
        async with TestClient(TestServer(app)) as client:
            response = await client.post("/v1/generate", json={"prompt": "a", "stream": stream})
            assert response.status == 200  # the status line went out with the first message
            return await response.text()

    body = asyncio.run(run())
    if not stream:
        reply = json.loads(body)  # one object: the text, the last message's fields and the error
        assert reply["text"] == "abc" and reply["finish_reason"] == "FINISH_REASON_LENGTH"
        assert reply["error"]["code"] == "UNAVAILABLE" and "unreachable" in reply["error"]["message"]
    else:
        events = [block for block in body.split("\n\n") if block]
        assert [json.loads(e.split("data: ", 1)[1]).get("text") for e in events[:2]] == ["ab", "c"]
        assert events[2].startswith("event: error\n") and "UNAVAILABLE" in events[2]
