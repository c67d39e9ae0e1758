"""The HTTP front end on a real server (gRPC and HTTP ports on loopback, the tiny exported
model in an engine process): every route, server-sent events read by a plain client and
compared with gRPC's text for the same request, sessions (continue, fork, reset, export,
import, list, delete), a client that disconnects mid-stream, the OpenAPI document and the
playground's files."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Iterator

import pytest
from google.protobuf import json_format

from protos.charstream.v1 import generator_pb2 as pb
from server.background import BackgroundServer
from server.clients.client import CharstreamClient
from server.config import ServerConfig
from server.http.pages import static_files
from server.http.routes import ROUTES
from tests.http_client import Http, abort_connection, read_events, stream_text

REPO_ROOT = Path(__file__).resolve().parents[1]
PROMPT = "To be"


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path) -> Iterator[BackgroundServer]:
    config = ServerConfig(model=str(tiny_model_dir), port=0, http_port=0, device="cpu", max_sessions=32,
                          max_chars=100_000)
    with BackgroundServer(config) as running:
        yield running


@pytest.fixture(scope="module")
def http(server: BackgroundServer) -> Http:
    return Http.of(server)


@pytest.fixture(scope="module")
def grpc_client(server: BackgroundServer) -> Iterator[CharstreamClient]:
    with CharstreamClient(server.address) as client:
        yield client


def test_model_route_says_what_get_model_info_says(http: Http, grpc_client: CharstreamClient) -> None:
    reply = http.call("GET", "/v1/model")
    assert reply.status == 200 and reply.headers["content-type"].startswith("application/json")
    expected = json_format.MessageToDict(grpc_client.model_info(), preserving_proto_field_name=True,
                                         always_print_fields_with_no_presence=True)
    assert reply.json() == {k: int(v) if isinstance(v, str) and v.isdigit() else v for k, v in expected.items()}


@pytest.mark.parametrize("options", [{"temperature": 0}, {"temperature": 0.8, "seed": 7},
                                     {"temperature": 1.3, "top_k": 5, "top_p": 0.9, "seed": "12345678901234567890"}])
def test_generate_streams_and_answers_the_text_grpc_gives(http: Http, grpc_client: CharstreamClient,
                                                          options: dict) -> None:
    grpc_options = {k: int(v) if k == "seed" else v for k, v in options.items()}
    expected = grpc_client.generate(PROMPT, 300, **grpc_options).text()
    request = {"prompt": PROMPT, "max_chars": 300, **options}

    events = http.events(request)
    assert all(name == "message" for name, _ in events)
    *middle, last = [data for _, data in events]
    assert all(set(data) == {"text"} and data["text"] for data in middle)  # every event carries characters
    assert last["finish_reason"] == "FINISH_REASON_LENGTH"
    assert (last["generated_chars"], last["prompt_chars"], last["matched_stop"]) == (300, len(PROMPT), "")
    assert stream_text(events) == expected

    whole = http.call("POST", "/v1/generate", request)  # no Accept: event-stream: one JSON object
    assert whole.status == 200 and whole.headers["content-type"].startswith("application/json")
    assert whole.json() == {"text": expected, "finish_reason": "FINISH_REASON_LENGTH", "generated_chars": 300,
                            "prompt_chars": len(PROMPT), "matched_stop": ""}

    flagged = http.call("POST", "/v1/generate", {**request, "stream": True})  # "stream": true = events too
    assert flagged.headers["content-type"].startswith("text/event-stream")
    assert flagged.body.startswith(b"data: {") and flagged.body.endswith(b"}\n\n")


def test_camel_case_names_and_stop_strings_as_grpc(http: Http, grpc_client: CharstreamClient) -> None:
    expected = grpc_client.generate(PROMPT, 400, temperature=1.0, seed=3, stop=["e", "o"])
    text = expected.text()
    reply = http.call("POST", "/v1/generate", {"prompt": PROMPT, "maxChars": 400, "temperature": 1.0, "seed": 3,
                                               "stop": ["e", "o"]}).json()
    assert reply["text"] == text and reply["finish_reason"] == "FINISH_REASON_STOP"
    assert reply["matched_stop"] == expected.matched_stop and text.endswith(reply["matched_stop"])


def test_sessions_continue_fork_reset_export_import_list_delete(http: Http, grpc_client: CharstreamClient) -> None:
    uninterrupted = grpc_client.generate(PROMPT, 120, temperature=0.9, seed=11).text()

    created = http.call("POST", "/v1/sessions", {"prompt": PROMPT, "temperature": 0.9, "seed": 11})
    assert created.status == 200
    session_id = created.json()["session_id"]
    info = created.json()["session"]
    assert (info["consumed_chars"], info["recent_text"], info["busy"]) == (len(PROMPT), PROMPT, False)
    assert info["temperature"] == pytest.approx(0.9)

    first = stream_text(http.events({"session_id": session_id, "max_chars": 50}))
    fork = http.call("POST", f"/v1/sessions/{session_id}:fork")
    assert fork.status == 200 and fork.json()["session"]["consumed_chars"] == len(PROMPT) + 50
    record = http.call("POST", f"/v1/sessions/{session_id}:export")
    assert record.status == 200 and record.headers["content-type"] == "application/octet-stream"

    second = http.call("POST", "/v1/generate", {"session_id": session_id, "max_chars": 70}).json()["text"]
    assert first + second == uninterrupted  # two calls on a session give one call's text
    forked = http.call("POST", "/v1/generate", {"session_id": fork.json()["session_id"], "max_chars": 70})
    assert forked.json()["text"] == second
    imported = http.call("POST", "/v1/sessions:import", record.body,
                         headers={"Content-Type": "application/octet-stream"})
    assert imported.status == 200, imported.body
    again = http.call("POST", "/v1/generate", {"session_id": imported.json()["session_id"], "max_chars": 70})
    assert again.json()["text"] == second
    # The record as base64 in JSON works too (the proto JSON mapping of bytes).
    import base64
    as_json = http.call("POST", "/v1/sessions:import", {"state": base64.b64encode(record.body).decode()})
    assert as_json.status == 200 and as_json.json()["session"]["consumed_chars"] == len(PROMPT) + 50

    got = http.call("GET", f"/v1/sessions/{session_id}").json()["session"]
    assert got["consumed_chars"] == len(PROMPT) + 120 and got["recent_text"] == (PROMPT + uninterrupted)[-256:]
    listed = http.call("GET", "/v1/sessions").json()
    ids = [s["session_id"] for s in listed["sessions"]]
    assert session_id in ids and fork.json()["session_id"] in ids and listed["max_sessions"] == 32

    reset = http.call("POST", f"/v1/sessions/{session_id}:reset", {"prompt": PROMPT, "seed": 11})
    assert reset.status == 200 and reset.json()["session"]["consumed_chars"] == len(PROMPT)
    assert http.call("POST", "/v1/generate", {"session_id": session_id, "max_chars": 120}).json()["text"] \
        == uninterrupted

    assert http.call("DELETE", f"/v1/sessions/{session_id}").json() == {}
    gone = http.call("GET", f"/v1/sessions/{session_id}")
    assert gone.status == 404 and gone.error["code"] == "NOT_FOUND" and "deleted" in gone.error["message"]
    for other in (fork, imported, as_json):
        http.call("DELETE", f"/v1/sessions/{other.json()['session_id']}")


@pytest.mark.parametrize("options", [{"temperature": 0}, {"temperature": 1.0, "seed": 5}])
def test_a_client_that_disconnects_mid_stream_leaves_the_session_exactly_what_was_written(
        http: Http, grpc_client: CharstreamClient, options: dict) -> None:
    total = 60_000
    uninterrupted = grpc_client.generate(PROMPT, total, **options).text()
    session_id = http.call("POST", "/v1/sessions", {"prompt": PROMPT, **options}).json()["session_id"]

    connection, response = http.open_stream({"session_id": session_id, "max_chars": total})
    received = ""
    for _, data in read_events(response):
        received += data["text"]
        if len(received) >= 200:
            break
    abort_connection(connection, response)

    deadline = time.monotonic() + 20
    while (info := http.call("GET", f"/v1/sessions/{session_id}").json()["session"])["busy"]:
        assert time.monotonic() < deadline, "the stream did not end after its client went away"
        time.sleep(0.02)
    delivered = info["consumed_chars"] - len(PROMPT)
    assert len(received) <= delivered < total, "the disconnect should land mid-stream"
    kept = uninterrupted[:delivered]
    assert received == kept[:len(received)]  # what arrived is what the session kept, in order
    assert info["recent_text"] == (PROMPT + kept)[-256:]
    rest = http.call("POST", "/v1/generate", {"session_id": session_id, "max_chars": min(total - delivered, 2000)})
    assert rest.json()["text"] == uninterrupted[delivered:delivered + 2000]  # nothing lost, nothing repeated
    http.call("DELETE", f"/v1/sessions/{session_id}")


def test_health_routes_say_what_the_grpc_health_service_says(http: Http) -> None:
    for path in ("/healthz", "/readyz"):
        reply = http.call("GET", path)
        assert (reply.status, reply.json()) == (200, {"status": "SERVING"})


def test_openapi_document_lists_every_route_with_its_schemas(http: Http) -> None:
    document = http.call("GET", "/openapi.json").json()
    assert document["openapi"].startswith("3.1")
    operations = {(method.upper(), path) for path, item in document["paths"].items() for method in item}
    assert {(route.method, route.path) for route in ROUTES} | {("GET", "/healthz"), ("GET", "/readyz")} == operations
    schemas = document["components"]["schemas"]
    assert set(schemas["GenerateRequest"]["properties"]) == {f.name for f in pb.GenerateRequest.DESCRIPTOR.fields}
    assert schemas["SessionInfo"]["properties"]["consumed_chars"]["format"] == "int64"
    generate = document["paths"]["/v1/generate"]["post"]
    assert set(generate["responses"]["200"]["content"]) == {"application/json", "text/event-stream"}
    for path, item in document["paths"].items():  # every $ref resolves
        for ref in re.findall(r'"\$ref": "#/components/schemas/(\w+)"', str(item).replace("'", '"')):
            assert ref in schemas, (path, ref)


def test_the_route_table_in_docs_matches_the_routes() -> None:
    text = (REPO_ROOT / "docs" / "http.md").read_text()
    documented = set(re.findall(r"^\| `(GET|POST|DELETE) ([^`]+)` \|", text, flags=re.MULTILINE))
    assert documented == {(route.method, route.path) for route in ROUTES} | {("GET", "/healthz"), ("GET", "/readyz"),
                                                                              ("GET", "/"), ("GET", "/openapi.json")}


def test_the_playground_is_served_self_contained(http: Http) -> None:
    page = http.call("GET", "/")
    assert page.status == 200 and page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "connect-src 'self'" in policy and "script-src 'self'" in policy
    html = page.body.decode()
    links = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert links and all(link.startswith("/") and not link.startswith("//") for link in links)  # this server's
    assert {link.rsplit(".", 1)[-1] for link in links if link.startswith("/static/")} == {"css", "js"}
    for asset in [f"/static/{name}" for name in static_files()]:  # every file, modules the page imports too
        reply = http.call("GET", asset)
        assert reply.status == 200 and reply.headers["x-content-type-options"] == "nosniff"
        # Nothing is fetched from another host: no absolute URLs in what the page loads.
        assert not re.search(rb"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}/", reply.body, flags=re.IGNORECASE), asset
    assert http.call("GET", "/static/../../server/config.py").status == 404
    assert http.call("GET", "/static/nothing.js").status == 404
