"""POST /v1/generate: the servicer's Generate, its messages written to the HTTP response.

The servicer streams exactly as for a gRPC call; only the context differs: a sink
whose `write` puts each GenerateResponse on the connection, as a server-sent event
(`Accept: text/event-stream` or `"stream": true`) or as the next piece of one JSON
object. Either way every message is written when the servicer hands it over: the
characters the session keeps are those written to the connection, and a client
that disconnects cancels the call (the handler is cancelled, as grpc.aio cancels a
call), so the engine undoes what was generated ahead. The response starts with the
first message: a request refused before any character (validation, a busy session,
a key's limit) gets its own HTTP status and JSON error body.
"""

from __future__ import annotations

import json

import grpc
from aiohttp import web

from protos.charstream.v1 import generator_pb2 as pb
from server.api.errors import ServiceError, failure_status
from server.http.calls import Calls
from server.http.codec import dumps, parse_json_object, to_json, to_message
from server.http.errors import error_json
from server.http.sse import EVENT_STREAM, sse_event

RPC = "Generate"


class SseSink:
    """GenerateResponse messages as server-sent events: `data: {"text": ...}` per message, the last
    message with every field (finish_reason, counts); a failure after the first as `event: error`
    (after the last one too, when a shared store's final write-back failed)."""

    def __init__(self, request: web.Request):
        self.request = request
        self.response: web.StreamResponse | None = None

    async def write(self, message: pb.GenerateResponse) -> None:
        response = self.response or await self._start()
        last = message.finish_reason != pb.FINISH_REASON_UNSPECIFIED
        await response.write(sse_event(to_json(message) if last else {"text": message.text}))

    async def close(self) -> None:
        """Every event has gone out as it came."""

    async def fail(self, error: ServiceError) -> None:
        assert self.response is not None
        await self.response.write(sse_event(error_json(error), event="error"))

    async def _start(self) -> web.StreamResponse:
        response = web.StreamResponse(headers={
            "Content-Type": f"{EVENT_STREAM}; charset=utf-8",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",  # a reverse proxy must pass each event on as it comes
        })
        await response.prepare(self.request)
        self.response = response
        return response


class JsonSink:
    """GenerateResponse messages as one JSON object, written piece by piece as they come:
    `{"text":"` and the characters of each message, then the last message's other fields once the
    call has ended. A failure after the first character closes the object with an "error" member
    instead (beside the last message's fields, when it failed after that one: a shared store's
    final write-back)."""

    def __init__(self, request: web.Request):
        self.request = request
        self.response: web.StreamResponse | None = None
        self._rest: dict | None = None  # the last message's fields but its text, written by close()

    async def write(self, message: pb.GenerateResponse) -> None:
        response = self.response or await self._start()
        if message.finish_reason != pb.FINISH_REASON_UNSPECIFIED:
            self._rest = to_json(message)
            del self._rest["text"]
        await response.write(json.dumps(message.text, ensure_ascii=False)[1:-1].encode("utf-8"))  # escaped, unquoted

    async def close(self) -> None:
        assert self.response is not None and self._rest is not None  # Generate writes a last message or raises
        await self.response.write(b'",' + dumps(self._rest)[1:])  # '","finish_reason":...}'

    async def fail(self, error: ServiceError) -> None:
        assert self.response is not None
        await self.response.write(b'",' + dumps({**(self._rest or {}), "error": error_json(error)["error"]})[1:])

    async def _start(self) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json; charset=utf-8"})
        await response.prepare(self.request)
        await response.write(b'{"text":"')
        self.response = response
        return response


def wants_stream(request: web.Request, fields: dict) -> bool:
    stream = fields.pop("stream", None)
    if stream is not None and not isinstance(stream, bool):
        raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT, f'"stream" must be true or false, got {json.dumps(stream)}')
    return bool(stream) or EVENT_STREAM in request.headers.get("Accept", "")


async def generate(request: web.Request, calls: Calls) -> web.StreamResponse:
    async def body() -> web.StreamResponse:
        fields = parse_json_object(await calls.read_body(request), "generate request")
        sink = SseSink(request) if wants_stream(request, fields) else JsonSink(request)
        message = to_message(fields, pb.GenerateRequest())
        try:
            await calls.service.Generate(message, sink)
        except ConnectionError:
            # The connection closed under a write: the client went away, a cancel (the servicer
            # has ended the stream; the session keeps what was written). aiohttp drops the rest.
            if sink.response is None:
                raise
            return sink.response
        except Exception as exc:  # noqa: BLE001 - after the first message the status line has gone out
            if sink.response is None:
                raise  # answered with its own status by calls.run
            await sink.fail(failure_status(RPC, exc, calls.metrics))
        else:
            await sink.close()
        assert sink.response is not None  # Generate writes a last message or raises
        await sink.response.write_eof()
        return sink.response

    return await calls.run(request, RPC, body)
