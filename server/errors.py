"""Errors as gRPC statuses: ServiceError for expected failures, and the one interceptor
that turns them (and anything unexpected, as INTERNAL) into a status on the call."""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Awaitable, Callable, Protocol

import grpc

from server.structured_log import log_event

logger = logging.getLogger("charstream.server")


class ServiceError(Exception):
    """An expected failure with the status code and a message the caller can act on."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


class ErrorCounter(Protocol):
    def count_error(self, method: str, code: grpc.StatusCode) -> None: ...


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Wraps the handlers of the services whose names start with `prefix`.

    ServiceError -> its status; an abort -> counted and passed on; any other
    exception -> logged with its traceback and returned as INTERNAL, so one
    bad call never takes the server down or leaks internals to the caller.
    """

    def __init__(self, prefix: str, counter: ErrorCounter):
        self._prefix = prefix
        self._counter = counter

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
        kinds = {
            "unary_unary": grpc.unary_unary_rpc_method_handler,
            "unary_stream": grpc.unary_stream_rpc_method_handler,
            "stream_unary": grpc.stream_unary_rpc_method_handler,
            "stream_stream": grpc.stream_stream_rpc_method_handler,
        }
        for attribute, make_handler in kinds.items():
            behavior = getattr(handler, attribute)
            if behavior is not None:
                return make_handler(
                    self._wrap(short_name, behavior),
                    request_deserializer=handler.request_deserializer,
                    response_serializer=handler.response_serializer,
                )
        return handler

    def _wrap(self, method: str, behavior: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        # Every charstream handler is a coroutine (streams use context.write), so one wrapper fits all.
        async def guarded(request: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                return await behavior(request, context)
            except ServiceError as error:
                self._counter.count_error(method, error.code)
                log_event(logger, "rpc_error", logging.INFO, method=method, code=error.code.name, message=error.message)
                await context.abort(error.code, error.message)
            except (asyncio.CancelledError, grpc.aio.AbortError):
                raise
            except Exception:  # noqa: BLE001 - the point of this interceptor
                logger.exception("unexpected error in %s", method)
                self._counter.count_error(method, grpc.StatusCode.INTERNAL)
                await context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method}; the server log has details")

        return guarded
