"""One HTTP request as one call of the gRPC servicer: the key, the RPC, its failure.

Every /v1 route ends here: the caller is identified from `Authorization: Bearer`
with the same keys and code as the gRPC interceptor (ApiKeys.authenticate_metadata),
the servicer method runs as it runs for a gRPC call (validation, limits, ownership),
and a failure becomes its status through the interceptor's own function
(failure_status: counted in the same metrics, logged the same way), then the
matching HTTP status and JSON body (errors.py).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

import grpc
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError
from grpc_health.v1 import health_pb2
from grpc_health.v1._async import HealthServicer

from server.api.auth import ApiKeys, reset_caller
from server.api.errors import ServiceError, failure_status
from server.api.service import GeneratorService
from server.http.errors import HttpServiceError, error_response
from server.metrics import ServerMetrics

Body = Callable[[], Awaitable[web.StreamResponse]]


class UnaryContext:
    """What the servicer's unary methods get for a context: they never use it (gRPC-only
    matters, such as metadata and aborts, are handled around the call)."""


NO_CONTEXT: Any = UnaryContext()


@dataclass
class Calls:
    service: GeneratorService
    health: HealthServicer
    api_keys: ApiKeys | None
    metrics: ServerMetrics
    max_message_bytes: int

    async def run(self, request: web.Request, rpc: str, body: Body) -> web.StreamResponse:
        """`body` as the caller of `request`, as RPC `rpc`; a failure answered as its error response."""
        token = None
        try:
            if self.api_keys is not None:
                token = self.api_keys.authenticate_metadata(
                    [("authorization", request.headers.get("Authorization", ""))])
            return await body()
        except asyncio.CancelledError:  # the client went away: nobody to answer
            raise
        except ConnectionError:  # so did this one, noticed by a read or a write: nobody to answer either
            return web.Response(status=499)
        except Exception as exc:  # noqa: BLE001 - every failure is answered, never passed to aiohttp
            return error_response(failure_status(rpc, exc, self.metrics))
        finally:
            if token is not None:
                reset_caller(token)

    async def read_body(self, request: web.Request) -> bytes:
        """The request body, within --max-message-bytes (the gRPC port's message limit)."""
        limit = self.max_message_bytes
        if request.content_length is not None and request.content_length > limit:
            raise too_large(request.content_length, limit)
        try:
            return await request.read()  # the app's client_max_size is the same limit
        except web.HTTPRequestEntityTooLarge:
            raise too_large(None, limit) from None
        except (RequestPayloadError, HttpProcessingError) as exc:  # e.g. a Content-Encoding the body breaks
            raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT, f"the request body could not be read: {exc}") from None

    async def health_status(self, service: str) -> str:
        """The gRPC health service's answer for `service` ("" = the whole server), by its own Check."""
        try:
            response = await self.health.Check(health_pb2.HealthCheckRequest(service=service), _HealthContext())
        except ServiceError:
            return "SERVICE_UNKNOWN"
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


def too_large(size: int | None, limit: int) -> HttpServiceError:
    what = f"of {size} bytes " if size is not None else ""
    return HttpServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                            f"request body {what}is over the limit of {limit} bytes (--max-message-bytes)", 413)


class _HealthContext:
    """The health servicer's Check aborts for a service it does not know."""

    async def abort(self, code: grpc.StatusCode, details: str = "") -> None:
        raise ServiceError(code, details or code.name)
