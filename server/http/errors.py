"""gRPC status codes as HTTP statuses, and the one shape of every HTTP error body:

    {"error": {"code": "NOT_FOUND", "message": "session 3f... does not exist"}}

`code` is the gRPC status name and `message` the gRPC status message of the same
failure: whatever a gRPC client would be told, an HTTP client is told too. Failures
of HTTP itself (no such route, a method the route does not take, a body over the
size limit) get the same shape, with the gRPC code that means the same.
"""

from __future__ import annotations

import grpc
from aiohttp import web

from server.api.errors import ServiceError
from server.http.codec import dumps

# FAILED_PRECONDITION is 409 Conflict, not 412: its usual cause is a session busy with another
# call (try again later), and 412 is about conditional request headers, which this API has none of.
HTTP_STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.FAILED_PRECONDITION: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,  # the client went away (nginx's code; only ever seen in logs)
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.DATA_LOSS: 500,
}
# HTTP's own failures (aiohttp raises them) and the gRPC code that means the same.
CODE_OF_HTTP = {400: grpc.StatusCode.INVALID_ARGUMENT, 404: grpc.StatusCode.NOT_FOUND,
                405: grpc.StatusCode.UNIMPLEMENTED, 413: grpc.StatusCode.RESOURCE_EXHAUSTED}


class HttpServiceError(ServiceError):
    """A ServiceError whose HTTP status is not the code's usual one (413 for a body over the limit)."""

    def __init__(self, code: grpc.StatusCode, message: str, http_status: int):
        super().__init__(code, message)
        self.http_status = http_status


def status_of(error: ServiceError) -> int:
    return error.http_status if isinstance(error, HttpServiceError) else HTTP_STATUS.get(error.code, 500)


def error_json(error: ServiceError) -> dict[str, dict[str, str]]:
    return {"error": {"code": error.code.name, "message": error.message}}


def error_response(error: ServiceError) -> web.Response:
    response = web.Response(status=status_of(error), body=dumps(error_json(error)), content_type="application/json")
    if error.code == grpc.StatusCode.UNAUTHENTICATED:
        response.headers["WWW-Authenticate"] = 'Bearer realm="charstream"'
    return response


def from_http_exception(exc: web.HTTPException) -> ServiceError:
    """aiohttp's own refusal (routing, method, body size) as the ServiceError it amounts to."""
    status = exc.status
    code = CODE_OF_HTTP.get(status, grpc.StatusCode.INVALID_ARGUMENT if status < 500 else grpc.StatusCode.INTERNAL)
    if status == 404:
        message = "no such route: see /openapi.json for the routes of this API"
    elif status == 405:
        allowed = ", ".join(sorted(getattr(exc, "allowed_methods", ()) or ()))
        message = f"this route does not take {exc.method if hasattr(exc, 'method') else 'that method'}" + (
            f"; it takes {allowed}" if allowed else "")
    else:
        message = exc.text or exc.reason
    return HttpServiceError(code, message, status)
