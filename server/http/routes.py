"""The routes of the HTTP API: one table (ROUTES), read by the router and by the OpenAPI
document (openapi.py), so that the two cannot disagree.

Each /v1 route is one Generator RPC: the path and JSON body make its request message,
the servicer answers it (calls.py), and its response message is the JSON reply.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Awaitable, Callable

import grpc
from aiohttp import web
from google.protobuf.message import Message

from protos.charstream.v1 import generator_pb2 as pb
from server.api.errors import ServiceError
from server.http.calls import NO_CONTEXT, Calls
from server.http.codec import dumps, parse_json_object, to_json, to_message
from server.http.errors import HttpServiceError, error_response
from server.http.generate import generate

CALLS = web.AppKey("calls", Calls)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
JSON = "application/json"
RECORD = "application/octet-stream"
INVALID = grpc.StatusCode.INVALID_ARGUMENT


@dataclass(frozen=True)
class Route:
    method: str
    path: str  # as the OpenAPI document shows it; `pattern` is the router's, where it differs
    rpc: str | None  # the Generator RPC it is (None: not part of the gRPC API)
    summary: str
    handler: Handler
    request: type[Message] | None = None  # the JSON body's message (with path fields left out)
    response: type[Message] | None = None  # the JSON reply's message
    body: str = JSON  # the request body's media type ("" = none)
    returns: str = JSON  # the reply's media type
    pattern: str = ""

    @property
    def router_path(self) -> str:
        return self.pattern or self.path


def json_reply(message: Message) -> web.Response:
    return web.Response(body=dumps(to_json(message)), content_type=JSON)


def session_id_of(request: web.Request) -> str:
    # Checked by the servicer (check_session_id), so a malformed id gets the gRPC message.
    return request.match_info["session_id"]


async def json_fields(request: web.Request, what: str, *, path_fields: tuple[str, ...] = ()) -> dict:
    fields = parse_json_object(await request.app[CALLS].read_body(request), what)
    for name in path_fields:  # a field that the path gives must not also come in the body
        camel = name.split("_")[0] + "".join(part.title() for part in name.split("_")[1:])
        if name in fields or camel in fields:
            raise ServiceError(INVALID, f"{name} comes from the path, not the body")
    return fields


def unary(rpc: str, build: Callable[[web.Request], Awaitable[Message]],
          reply: Callable[[Message], web.StreamResponse] = json_reply) -> Handler:
    """A handler that calls servicer method `rpc` with the message `build` makes of the request."""
    async def handle(request: web.Request) -> web.StreamResponse:
        calls = request.app[CALLS]

        async def body() -> web.StreamResponse:
            message = await build(request)
            return reply(await getattr(calls.service, rpc)(message, NO_CONTEXT))

        return await calls.run(request, rpc, body)

    return handle


def empty(message_class: type[Message]) -> Callable[[web.Request], Awaitable[Message]]:
    async def build(request: web.Request) -> Message:
        return message_class()
    return build


async def create_request(request: web.Request) -> Message:
    return to_message(await json_fields(request, "create session"), pb.CreateSessionRequest())


def by_id(message_class: type[Message]) -> Callable[[web.Request], Awaitable[Message]]:
    async def build(request: web.Request) -> Message:
        return message_class(session_id=session_id_of(request))
    return build


async def reset_request(request: web.Request) -> Message:
    fields = await json_fields(request, "reset session", path_fields=("session_id",))
    message = to_message(fields, pb.ResetSessionRequest())
    message.session_id = session_id_of(request)
    return message


async def import_request(request: web.Request) -> Message:
    """The record as the body's bytes, or (Content-Type: application/json) {"state": base64}."""
    calls = request.app[CALLS]
    if request.content_type == JSON:
        return to_message(parse_json_object(await calls.read_body(request), "import session"),
                          pb.ImportSessionRequest())
    state = await calls.read_body(request)
    if not state:
        raise ServiceError(INVALID, "the body is empty: send the bytes that :export returned "
                                    f"(Content-Type: {RECORD})")
    return pb.ImportSessionRequest(state=state)


def record_reply(message: Message) -> web.StreamResponse:
    assert isinstance(message, pb.ExportSessionResponse)
    return web.Response(body=message.state, content_type=RECORD,
                        headers={"Content-Disposition": 'attachment; filename="session.charstream"'})


async def generate_handler(request: web.Request) -> web.StreamResponse:
    return await generate(request, request.app[CALLS])


SESSION_ACTIONS = {  # POST /v1/sessions/{id}:ACTION -> handler
    "reset": unary("ResetSession", reset_request),
    "fork": unary("ForkSession", by_id(pb.ForkSessionRequest)),
    "export": unary("ExportSession", by_id(pb.ExportSessionRequest), record_reply),
}


def action(name: str) -> Handler:
    return SESSION_ACTIONS[name]


async def session_action(request: web.Request) -> web.StreamResponse:
    handler = SESSION_ACTIONS.get(request.match_info["action"])
    if handler is None:
        known = ", ".join(f":{name}" for name in SESSION_ACTIONS)
        return error_response(HttpServiceError(grpc.StatusCode.NOT_FOUND, f"no session action "
                                               f":{request.match_info['action'][:40]}; known: {known}", 404))
    return await handler(request)


ID = "{session_id}"
ID_PATTERN = "{session_id:[^/:]*}"
ROUTES: tuple[Route, ...] = (
    Route("GET", "/v1/model", "GetModelInfo", "the model (vocabulary, sizes, variant, provider) and the limits",
          unary("GetModelInfo", empty(pb.GetModelInfoRequest)), response=pb.GetModelInfoResponse, body=""),
    Route("POST", "/v1/generate", "Generate",
          "generate text: one JSON object, or server-sent events with Accept: text/event-stream or "
          '"stream": true', generate_handler, pb.GenerateRequest, pb.GenerateResponse),
    Route("POST", "/v1/sessions", "CreateSession", "create a session (optional prompt, sampling defaults, seed)",
          unary("CreateSession", create_request), pb.CreateSessionRequest, pb.CreateSessionResponse),
    Route("GET", "/v1/sessions", "ListSessions", "the caller's sessions, most recently used first",
          unary("ListSessions", empty(pb.ListSessionsRequest)), response=pb.ListSessionsResponse, body=""),
    Route("GET", f"/v1/sessions/{ID}", "GetSession", "one session: consumed count, recent text, defaults",
          unary("GetSession", by_id(pb.GetSessionRequest)), response=pb.GetSessionResponse, body="",
          pattern=f"/v1/sessions/{ID_PATTERN}"),
    Route("DELETE", f"/v1/sessions/{ID}", "DeleteSession", "delete a session",
          unary("DeleteSession", by_id(pb.DeleteSessionRequest)), response=pb.DeleteSessionResponse, body="",
          pattern=f"/v1/sessions/{ID_PATTERN}"),
    Route("POST", f"/v1/sessions/{ID}:reset", "ResetSession", "empty a session's state (optional prompt, seed)",
          action("reset"), pb.ResetSessionRequest, pb.ResetSessionResponse,
          pattern=f"/v1/sessions/{ID_PATTERN}:{{action}}"),
    Route("POST", f"/v1/sessions/{ID}:fork", "ForkSession", "a new session with the same state and random stream",
          action("fork"), response=pb.ForkSessionResponse, body=""),
    Route("POST", f"/v1/sessions/{ID}:export", "ExportSession", "the session's record (bytes)",
          action("export"), body="", returns=RECORD),
    Route("POST", "/v1/sessions:import", "ImportSession",
          "a new session from a record (the bytes :export returned)",
          unary("ImportSession", import_request), response=pb.ImportSessionResponse, body=RECORD),
)


def session_route_of_action() -> Route:
    """The one router entry that takes POST /v1/sessions/{id}:ACTION (for every ACTION)."""
    first = next(route for route in ROUTES if route.pattern.endswith(":{action}"))
    return Route(first.method, first.path, None, "", session_action, pattern=first.pattern)


def add_routes(app: web.Application) -> None:
    for route in ROUTES:
        if route.path.startswith(f"/v1/sessions/{ID}:"):
            continue  # the actions share one router entry (below)
        app.router.add_route(route.method, route.router_path, route.handler)
    action_route = session_route_of_action()
    app.router.add_route(action_route.method, action_route.router_path, action_route.handler)
