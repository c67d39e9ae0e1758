"""The HTTP port's security on real servers: TLS and mutual TLS from the gRPC port's files
(renewal included, one watcher for both ports), API keys and session ownership, per-key
limits, cross-origin refusal and --http-cors, and the DNS-rebinding host check."""

from __future__ import annotations

import http.client
import logging
import socket
import ssl
import time
from pathlib import Path
from typing import Iterator

import grpc
import pytest
from cryptography import x509

from protos.charstream.v1 import generator_pb2 as pb
from protos.charstream.v1 import generator_pb2_grpc as pb_grpc
from server.background import BackgroundServer
from server.clients.client import CharstreamClient, tls_credentials
from server.config import ServerConfig
from server.http.routes import ROUTES
from tests.http_client import Http, abort_connection, read_events
from tests.test_tls import _replace
from tests.tls_certs import Issued, Pki, make_pki

SECRET_A = "alpha-secret-0123456789"
SECRET_B = "bravo-secret-9876543210"
ALLOWED = "http://tools.example:3000"
UNKNOWN_ID = "0123456789abcdef0123456789abcdef"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackgroundServer]:
    """TLS, two API keys (two streams each), one allowed origin."""
    keys = tmp_path_factory.mktemp("keys") / "keys.txt"
    keys.write_text(f"alice:{SECRET_A}\nbob:{SECRET_B}\n")
    config = ServerConfig(model=str(tiny_model_dir), port=0, http_port=0, device="cpu", max_sessions=16,
                          max_chars=100_000, api_keys=str(keys), max_streams_per_key=2,
                          tls_cert=str(pki.server.cert_path), tls_key=str(pki.server.key_path), http_cors=ALLOWED)
    with BackgroundServer(config) as running:
        yield running


def https(pki: Pki, client: Issued | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.ca.cert_path))
    if client is not None:
        context.load_cert_chain(str(client.cert_path), str(client.key_path))
    return context


@pytest.fixture(scope="module")
def alice(server: BackgroundServer, pki: Pki) -> Http:
    return Http.of(server, context=https(pki), key=SECRET_A)


@pytest.fixture(scope="module")
def bob(server: BackgroundServer, pki: Pki) -> Http:
    return Http.of(server, context=https(pki), key=SECRET_B)


def grpc_details(server: BackgroundServer, pki: Pki, call, key: str | None = None) -> tuple[str, str]:  # type: ignore[no-untyped-def]
    with CharstreamClient(server.address, credentials=tls_credentials(str(pki.ca.cert_path)), api_key=key) as client:
        with pytest.raises(grpc.RpcError) as failure:
            call(pb_grpc.GeneratorStub(client.channel))
    return failure.value.code().name, failure.value.details()


def test_every_api_route_needs_a_key_and_says_what_grpc_says(server: BackgroundServer, pki: Pki) -> None:
    expected = grpc_details(server, pki, lambda stub: stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10))
    assert expected[0] == "UNAUTHENTICATED"
    for key in (None, "wrong-secret-0123456789"):
        http = Http.of(server, context=https(pki), key=key)
        for route in ROUTES:
            path = route.path.replace("{session_id}", UNKNOWN_ID)
            reply = http.call(route.method, path, {} if route.method == "POST" else None)
            assert reply.status == 401, (route.path, reply.body)
            assert (reply.error["code"], reply.error["message"]) == expected
            assert reply.headers["www-authenticate"].startswith("Bearer")
    open_routes = Http.of(server, context=https(pki))  # no key needed: health, the page, the document
    for path in ("/healthz", "/readyz", "/", "/openapi.json", "/static/playground.js"):
        assert open_routes.call("GET", path).status == 200, path
    assert open_routes.call("GET", "/openapi.json").json()["paths"]["/v1/model"]["get"]["security"] == [{"bearer": []}]


def test_another_keys_session_is_as_unknown_as_an_unknown_id(server: BackgroundServer, pki: Pki,
                                                              alice: Http, bob: Http) -> None:
    session_id = alice.call("POST", "/v1/sessions", {"prompt": "To be", "seed": 1}).json()["session_id"]
    attempts = {
        "GET": ("GET", "/v1/sessions/{}", None),
        "DELETE": ("DELETE", "/v1/sessions/{}", None),
        "reset": ("POST", "/v1/sessions/{}:reset", {}),
        "fork": ("POST", "/v1/sessions/{}:fork", None),
        "export": ("POST", "/v1/sessions/{}:export", None),
        "generate": ("POST", "/v1/generate", "session"),
    }
    def call(method: str, path: str, body: object, target: str) -> tuple[int, bytes]:
        payload = {"session_id": target, "max_chars": 3} if body == "session" else body
        reply = bob.call(method, path.format(target), payload)
        return reply.status, reply.body

    for name, (method, path, body) in attempts.items():
        status, theirs = call(method, path, body, session_id)
        unknown_status, unknown = call(method, path, body, UNKNOWN_ID)
        assert status == unknown_status == 404, name
        assert theirs == unknown.replace(UNKNOWN_ID.encode(), session_id.encode()), name  # byte for byte
    code, message = grpc_details(server, pki, lambda stub: stub.GetSession(
        pb.GetSessionRequest(session_id=session_id), timeout=10), key=SECRET_B)
    assert bob.call("GET", f"/v1/sessions/{session_id}").error == {"code": code, "message": message}
    assert session_id not in str(bob.call("GET", "/v1/sessions").json())
    assert session_id in str(alice.call("GET", "/v1/sessions").json())
    assert alice.call("GET", f"/v1/sessions/{session_id}").status == 200  # bob's attempts changed nothing
    alice.call("DELETE", f"/v1/sessions/{session_id}")


def test_a_keys_stream_limit_counts_http_streams(alice: Http, bob: Http) -> None:
    streams = [alice.open_stream({"prompt": "To be", "max_chars": 100_000, "temperature": 0})
               for _ in range(2)]
    try:
        for _, response in streams:  # both running: their first event arrived
            assert response.status == 200 and next(read_events(response))[1]["text"]
        third = alice.call("POST", "/v1/generate", {"prompt": "To be", "max_chars": 5})
        assert third.status == 429 and third.error["code"] == "RESOURCE_EXHAUSTED"
        assert "--max-streams-per-key" in third.error["message"]
        assert bob.call("POST", "/v1/generate", {"prompt": "To be", "max_chars": 5}).status == 200  # his own quota
    finally:
        for connection, response in streams:
            abort_connection(connection, response)
    deadline = time.monotonic() + 10  # the disconnects cancel both streams: the quota is free again
    while alice.call("POST", "/v1/generate", {"prompt": "To be", "max_chars": 5}).status == 429:
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_plain_http_and_untrusted_clients_get_nothing_from_the_tls_port(server: BackgroundServer, pki: Pki) -> None:
    port = server.running.http.port  # type: ignore[union-attr]
    plain = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    with pytest.raises((http.client.HTTPException, ConnectionError, OSError)):
        plain.request("GET", "/healthz")
        plain.getresponse().read()
    plain.close()
    stranger = ssl.create_default_context(cafile=str(pki.other_ca.cert_path))
    with pytest.raises(ssl.SSLCertVerificationError):
        Http(port, context=stranger).call("GET", "/healthz")


def test_cross_origin_requests_are_refused_unless_allowed(server: BackgroundServer, alice: Http) -> None:
    own = f"https://127.0.0.1:{server.running.http.port}"  # type: ignore[union-attr]
    refused = alice.call("GET", "/v1/model", headers={"Origin": "http://evil.example"})
    assert refused.status == 403 and refused.error["code"] == "PERMISSION_DENIED"
    assert "--http-cors http://evil.example" in refused.error["message"]
    assert "access-control-allow-origin" not in refused.headers
    preflight = alice.call("OPTIONS", "/v1/generate", headers={"Origin": "http://evil.example",
                                                               "Access-Control-Request-Method": "POST"})
    assert preflight.status == 403

    allowed = alice.call("GET", "/v1/model", headers={"Origin": ALLOWED})
    assert allowed.status == 200 and allowed.headers["access-control-allow-origin"] == ALLOWED
    preflight = alice.call("OPTIONS", "/v1/generate", headers={
        "Origin": ALLOWED, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})
    assert preflight.status == 204 and preflight.headers["access-control-allow-origin"] == ALLOWED
    assert "Authorization" in preflight.headers["access-control-allow-headers"]
    stream = alice.call("POST", "/v1/generate", {"prompt": "To be", "max_chars": 5, "stream": True},
                        headers={"Origin": ALLOWED})
    assert stream.headers["access-control-allow-origin"] == ALLOWED  # streamed replies carry it too

    same = alice.call("POST", "/v1/generate", {"prompt": "To be", "max_chars": 5}, headers={"Origin": own})
    assert same.status == 200 and "access-control-allow-origin" not in same.headers


def test_a_loopback_server_answers_only_for_loopback_host_names(alice: Http) -> None:
    for host in ("localhost", "127.0.0.1", "app.localhost"):
        assert alice.call("GET", "/readyz", headers={"Host": host}).status == 200, host
    rebound = alice.call("GET", "/v1/model", headers={"Host": "attacker.example:8080"})
    assert rebound.status == 403 and "DNS rebinding" in rebound.error["message"]


# --- mutual TLS and renewal -----------------------------------------------------------------------


def served_serial(port: int, context: ssl.SSLContext) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def wait_for_serial(port: int, context: ssl.SSLContext, serial: int) -> int:
    deadline = time.monotonic() + 5
    while (seen := served_serial(port, context)) != serial and time.monotonic() < deadline:
        time.sleep(0.1)
    return seen


def test_mutual_tls_and_renewal_follow_the_grpc_ports_files(tiny_model_dir: Path, pki: Pki, tmp_path: Path,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    live = Issued(pki.server.certificate, pki.server.key, pki.server.cert_pem, pki.server.key_pem,
                  tmp_path / "tls.crt", tmp_path / "tls.key")
    _replace(pki.server.cert_path, live.cert_path)
    _replace(pki.server.key_path, live.key_path)
    caplog.set_level(logging.INFO, logger="charstream.server")
    config = ServerConfig(model=str(tiny_model_dir), port=0, http_port=0, device="cpu", max_sessions=4,
                          tls_cert=str(live.cert_path), tls_key=str(live.key_path),
                          tls_client_ca=str(pki.ca.cert_path))
    with BackgroundServer(config) as server:
        port = server.running.http.port  # type: ignore[union-attr]
        member = https(pki, pki.client)
        assert Http(port, context=member).call("GET", "/readyz").status == 200
        for outsider in (https(pki), https(pki, pki.other_client)):  # no certificate, or another CA's
            with pytest.raises((ssl.SSLError, ConnectionError)):
                Http(port, context=outsider).call("GET", "/readyz")

        assert served_serial(port, member) == pki.server.serial
        renewed = pki.new_server("renewed")
        _replace(renewed.cert_path, live.cert_path)
        _replace(renewed.key_path, live.key_path)
        assert wait_for_serial(port, member, renewed.serial) == renewed.serial
        assert Http(port, context=member).call("POST", "/v1/generate", {"prompt": "To be", "max_chars": 5}).status == 200
        # The HTTP port's handshake saw the renewal first; the gRPC port, asking the same watcher
        # afterwards, must serve the renewed certificate too (not "no change since the last check").
        h2 = https(pki, pki.client)
        h2.set_alpn_protocols(["h2"])  # gRPC speaks HTTP/2 only
        assert served_serial(server.port, h2) == renewed.serial

        _replace(renewed.key_pem[: len(renewed.key_pem) // 2], live.key_path)  # a half-written key
        for _ in range(3):
            assert served_serial(port, member) == renewed.serial
        # gRPC handshakes on the same files: one watcher, so the broken key is reported once.
        with CharstreamClient(server.address, credentials=tls_credentials(
                str(pki.ca.cert_path), str(pki.client.cert_path), str(pki.client.key_path))) as client:
            assert client.model_info().vocab_size > 0
        failures = [r for r in caplog.records if r.getMessage() == "tls_reload_failed"]
        assert len(failures) == 1 and str(live.key_path) in failures[0].event_fields["error"]
