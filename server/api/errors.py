"""Errors as gRPC statuses: ServiceError for expected failures, and the one interceptor
that turns them (and anything unexpected, as INTERNAL) into a status on the call.

The interceptor also owns request parsing: grpc turns a deserializer that raises into
UNKNOWN before any handler runs, so bytes that are not the request message (bad
UTF-8 in a string field, a truncated varint, garbage) would get an unhelpful status
and escape the error metrics. Instead the deserializer stands in an UnparseableRequest
and the wrapped handler ends the call with INVALID_ARGUMENT.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, AsyncIterator, Awaitable, Callable, Protocol

import grpc
from google.protobuf.message import DecodeError

from server.structured_log import log_event

logger = logging.getLogger("charstream.server")

Deserializer = Callable[[bytes], Any]


class ServiceError(Exception):
    """An expected failure with the status code and a message the caller can act on."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


class ErrorCounter(Protocol):
    def count_error(self, method: str, code: grpc.StatusCode) -> None: ...


class UnparseableRequest:
    """Stands in for a request message whose bytes did not parse.

    It keeps only what the error message needs: never the bytes themselves, which
    may be large or hostile and do not belong in logs or replies."""

    __slots__ = ("message_name", "reason", "size")

    def __init__(self, message_name: str, reason: str, size: int):
        self.message_name = message_name
        self.reason = reason
        self.size = size

    def error(self) -> ServiceError:
        return ServiceError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"request is not a valid {self.message_name} message: {self.reason} ({self.size} bytes received)",
        )


def parse_failure(error: Exception) -> str:
    """Why the bytes did not parse, in words a client author can act on.

    Built from the kind of failure rather than the parser's text, which may quote
    the offending bytes (the pure-Python parser does for bad UTF-8)."""
    if isinstance(error, UnicodeDecodeError) or "UTF-8" in str(error):
        return "string fields must be valid UTF-8"
    if isinstance(error, DecodeError):
        return "the bytes are not well-formed protobuf wire format (truncated, or a bad tag, wire type or length)"
    return f"the bytes do not parse ({type(error).__name__})"


def message_name(deserializer: Deserializer, method: str) -> str:
    """The full protobuf name of the message `deserializer` makes (it is `SomeMessage.FromString`)."""
    message_class = getattr(deserializer, "__self__", None)
    descriptor = getattr(message_class, "DESCRIPTOR", None)
    full_name = getattr(descriptor, "full_name", None)
    return full_name if isinstance(full_name, str) else f"{method} request"


def tolerant(deserializer: Deserializer | None, method: str) -> Deserializer | None:
    """`deserializer`, returning an UnparseableRequest where it would raise."""
    if deserializer is None:  # the handler takes raw bytes: nothing can fail to parse
        return None
    name = message_name(deserializer, method)

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as error:  # noqa: BLE001 - any raise here would become UNKNOWN inside grpc
            return UnparseableRequest(name, parse_failure(error), len(data))

    return deserialize


class CheckedRequests:
    """The request stream of a stream-request call; a message that did not parse raises
    ServiceError(INVALID_ARGUMENT) where the handler reads it, so the handler's own
    error path (cleanup, then the status) ends the call. Messages before it are served."""

    def __init__(self, requests: AsyncIterator[Any]):
        self._requests = aiter(requests)

    def __aiter__(self) -> "CheckedRequests":
        return self

    async def __anext__(self) -> Any:
        request = await anext(self._requests)
        if isinstance(request, UnparseableRequest):
            raise request.error()
        return request


HANDLER_KINDS = {  # handler attribute -> (how to rebuild it, whether its requests are a stream)
    "unary_unary": (grpc.unary_unary_rpc_method_handler, False),
    "unary_stream": (grpc.unary_stream_rpc_method_handler, False),
    "stream_unary": (grpc.stream_unary_rpc_method_handler, True),
    "stream_stream": (grpc.stream_stream_rpc_method_handler, True),
}


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Wraps the handlers of the services whose names start with `prefix`.

    ServiceError -> its status; an abort -> counted and passed on; a request that
    does not parse -> INVALID_ARGUMENT; any other exception -> logged with its
    traceback and returned as INTERNAL, so one bad call never takes the server
    down or leaks internals to the caller.
    """

    def __init__(self, prefix: str, counter: ErrorCounter,
                 authenticate: Callable[[grpc.aio.ServicerContext], None] | None = None):
        self._prefix = prefix
        self._counter = counter
        # Called first in every call: raises ServiceError (UNAUTHENTICATED) or records the caller
        # for the handler (a context variable set here is seen by the handler: same task).
        self._authenticate = authenticate

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not method.startswith(self._prefix):
            return handler
        short_name = method.rsplit("/", 1)[-1]
        for attribute, (make_handler, request_stream) in HANDLER_KINDS.items():
            behavior = getattr(handler, attribute)
            if behavior is not None:
                return make_handler(
                    self._wrap(short_name, behavior, request_stream),
                    request_deserializer=tolerant(handler.request_deserializer, method),
                    response_serializer=handler.response_serializer,
                )
        return handler

    def _wrap(
        self, method: str, behavior: Callable[..., Awaitable[Any]], request_stream: bool
    ) -> Callable[..., Awaitable[Any]]:
        # Every charstream handler is a coroutine (streams use context.write), so one wrapper fits all.
        # grpc.aio hands a coroutine behavior of a stream-request method an async iterator of the
        # deserialized messages; a handler that calls context.read() instead would see the
        # UnparseableRequest itself (none does).
        async def guarded(request: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                if self._authenticate is not None:
                    self._authenticate(context)
                if request_stream:
                    request = CheckedRequests(request)
                elif isinstance(request, UnparseableRequest):
                    raise request.error()
                return await behavior(request, context)
            except (asyncio.CancelledError, grpc.aio.AbortError):
                raise
            except Exception as exc:  # noqa: BLE001 - the point of this interceptor
                error = failure_status(method, exc, self._counter)
                await context.abort(error.code, error.message)

        return guarded


def failure_status(method: str, exc: Exception, counter: ErrorCounter) -> ServiceError:
    """The status a failed call of `method` ends with, counted and logged: a ServiceError as it is;
    anything else logged with its traceback and answered as INTERNAL, without internals.

    The one place that decides this, for the gRPC interceptor and the HTTP front end alike."""
    if isinstance(exc, ServiceError):
        counter.count_error(method, exc.code)
        log_event(logger, "rpc_error", logging.INFO, method=method, code=exc.code.name, message=exc.message)
        return exc
    logger.error("unexpected error in %s", method, exc_info=exc)
    counter.count_error(method, grpc.StatusCode.INTERNAL)
    return ServiceError(grpc.StatusCode.INTERNAL, f"internal error in {method}; the server log has details")
