"""The charstream.v1.Generator servicer: converts messages, validates, streams.

It never calls ONNX Runtime: generation goes through the engine, sessions
through the store. Generate and Converse share one opening and one streaming
loop (`_stream`): each write takes every character ready for the stream
(delivered from that moment, before the write is awaited), so when a call
ends early the session keeps exactly what was handed over and the engine
undoes what was generated ahead of it.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import time
from typing import Any, AsyncIterator, Callable, Protocol

import grpc

from protos.charstream.v1 import generator_pb2 as pb
from server.api.auth import caller
from server.api.errors import ServiceError
from server.api.session_rpcs import SessionRPCs, store_errors
from server.api.stream_quota import StreamQuota
from server.api.validation import (
    Limits,
    check_max_chars,
    check_session_id,
    check_stops,
    check_text,
    resolve_settings,
    seed_of,
)
from server.engine.generation import (
    CANCELLED,
    ERROR,
    LENGTH,
    SHUTDOWN,
    STOP,
    GenerationRequest,
    StreamEvent,
)
from server.engine.runtime.interface import GenerationEngine
from server.engine.sampling import DEFAULT_SETTINGS
from server.metrics import ServerMetrics
from server.sessions.backend import SessionBackend
from server.sessions.memory import Session
from server.sessions.record import ModelFingerprint
from server.structured_log import log_event

logger = logging.getLogger("charstream.server")
Context = grpc.aio.ServicerContext

FINISH_REASONS = {
    LENGTH: pb.FINISH_REASON_LENGTH,
    STOP: pb.FINISH_REASON_STOP,
    CANCELLED: pb.FINISH_REASON_CANCELLED,
    SHUTDOWN: pb.FINISH_REASON_SHUTDOWN,
}
MakeResponse = Callable[[str, StreamEvent | None, int], object]  # (text, end, generated so far) -> message


class MessageSink(Protocol):
    """Where a stream's messages go: the gRPC call's context, or the HTTP front end's response
    (server/http/generate.py). A message counts as delivered once `write` is called with it."""

    async def write(self, message: Any) -> None: ...


Sink = Context | MessageSink


class GeneratorService(SessionRPCs):
    def __init__(
        self,
        engine: GenerationEngine,
        store: SessionBackend,
        limits: Limits,
        metrics: ServerMetrics,
        model_info: pb.GetModelInfoResponse,
        fingerprint: ModelFingerprint,
        streams_per_key: int | None = None,
        coalesce_streams: int = 0,
    ):
        super().__init__(engine, store, limits, metrics, fingerprint)
        self.model_info = model_info
        self.coalesce_streams = coalesce_streams  # 0: write whatever is ready (see _min_chars)
        self.shutting_down = asyncio.Event()
        self.active_streams = 0
        self.streams_per_key = streams_per_key  # None: no per-key limit (the server has no API keys)
        self._quota = StreamQuota(streams_per_key, store)

    async def GetModelInfo(
        self, request: pb.GetModelInfoRequest, context: Context
    ) -> pb.GetModelInfoResponse:
        return self.model_info

    # ---- streaming RPCs ----

    async def Generate(self, request: pb.GenerateRequest, context: Sink) -> None:
        async with self._quota.held(caller()):
            await self._generate(request, context)

    async def _generate(self, request: pb.GenerateRequest, context: Sink) -> None:
        max_chars = check_max_chars(request.max_chars, self.limits)
        tokens = check_text(self.engine.vocab, request.prompt, self.limits)
        stops = check_stops(request.stop, self.engine.vocab, self.limits)
        resolve_settings(request, DEFAULT_SETTINGS)  # reject bad values before taking the session
        seed = seed_of(request)
        one_shot = not request.session_id
        with store_errors():
            if one_shot:
                if not tokens:
                    message = "a one-shot Generate (no session_id) needs a prompt"
                    raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT, message)
                # The prompt opens the session (a zero state: the prefix-state cache applies).
                session = await self.store.create_ephemeral(
                    DEFAULT_SETTINGS, secrets.randbits(64) if seed is None else seed, tokens, request.prompt, caller()
                )
            else:
                session = await self.store.acquire(check_session_id(request.session_id), caller())
        try:
            if session.consumed_chars + len(tokens) == 0:
                raise ServiceError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"session {session.id} has consumed no text yet: send a prompt (at least one character)",
                )
            prompt = () if one_shot else tuple(tokens)
            job = GenerationRequest(prompt, max_chars, resolve_settings(request, session.settings), seed, stops)

            def response(text: str, end: StreamEvent | None, generated: int) -> pb.GenerateResponse:
                message = pb.GenerateResponse(text=text)
                if end is not None:
                    message.finish_reason = FINISH_REASONS[end.finish]  # type: ignore[index]
                    message.generated_chars = generated
                    message.prompt_chars = len(tokens)
                    message.matched_stop = end.matched_stop
                return message

            await self._stream(session, job, context, response, prompt_chars=len(tokens))
        finally:
            with store_errors():
                if one_shot:
                    await self.store.discard(session)
                else:
                    await self.store.release(session)

    async def Converse(
        self, request_iterator: AsyncIterator[pb.ConverseRequest], context: Context
    ) -> None:
        async with self._quota.held(caller()):
            await self._converse(request_iterator, context)

    async def _converse(self, request_iterator: AsyncIterator[pb.ConverseRequest], context: Context) -> None:
        with store_errors():
            session = await self.store.create_ephemeral(DEFAULT_SETTINGS, secrets.randbits(64), [], "", caller())
        log_event(logger, "conversation_opened", session=session.id[:8])
        turns = aiter(request_iterator)
        try:
            for turn in itertools.count():
                message = await self._next_turn(turns)
                if message is None:
                    return
                max_chars = check_max_chars(message.max_chars, self.limits)
                tokens = check_text(self.engine.vocab, message.text, self.limits, field="text")
                if session.consumed_chars + len(tokens) == 0:
                    raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT, "the first turn of a conversation needs text")
                job = GenerationRequest(
                    tuple(tokens),
                    max_chars,
                    resolve_settings(message, session.settings),
                    seed_of(message),
                    check_stops(message.stop, self.engine.vocab, self.limits),
                )

                def response(text: str, end: StreamEvent | None, generated: int, turn: int = turn) -> pb.ConverseResponse:
                    reply = pb.ConverseResponse(text=text, turn=turn, session_id=session.id)
                    if end is not None:
                        reply.finish_reason = FINISH_REASONS[end.finish]  # type: ignore[index]
                        reply.generated_chars = generated
                        reply.matched_stop = end.matched_stop
                    return reply

                if await self._stream(session, job, context, response) == SHUTDOWN:
                    return
        finally:
            await self.store.discard(session)
            log_event(logger, "conversation_closed", session=session.id[:8])

    async def _next_turn(self, turns: AsyncIterator[pb.ConverseRequest]) -> pb.ConverseRequest | None:
        """The client's next turn; None when it half-closed or the server is shutting down."""
        if self.shutting_down.is_set():
            return None
        reading = asyncio.ensure_future(anext(turns))
        stopping = asyncio.ensure_future(self.shutting_down.wait())
        try:
            await asyncio.wait({reading, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
            if not reading.done():  # shutting down, or this call was cancelled
                reading.cancel()
            elif not reading.cancelled():
                reading.exception()  # mark its outcome read: if this call is being cancelled, nothing below reads it
        # A cancelled task stays pending until it next runs: not done means not read.
        if not reading.done() or reading.cancelled():
            return None
        try:
            return reading.result()
        except StopAsyncIteration:
            return None

    async def _stream(
        self, session: Session, job: GenerationRequest, context: Sink, response: MakeResponse,
        prompt_chars: int | None = None,
    ) -> str:
        """Run one generation on `session` and stream it to the client; returns its finish reason.

        Every write takes all the characters ready (coalescing). If the call ends
        before the generation does (cancel, deadline, disconnect, an error), the
        stream is aborted: the session keeps the prompt and every character
        handed over, and the engine undoes the characters generated ahead. `prompt_chars`: the
        call's prompt for the log, when the job does not carry it (a one-shot call's prompt
        opened the session)."""
        stream = self.engine.submit(session.slot, job)
        stream.on_update = session.record  # the session's count and recent text follow the stream
        started = time.monotonic()
        finish = CANCELLED
        write_back, written_back = self.store.write_back_chars, 0
        self.metrics.active_streams.inc()
        self.active_streams += 1
        try:
            opening = await stream.opening()
            if opening.refused:
                if opening.error is not None:
                    finish = ERROR
                    raise self._failure(session, opening)
                finish = SHUTDOWN  # refused while shutting down
                await context.write(response("", opening, 0))
                return finish
            while True:
                chunk = await stream.next_chunk(self._min_chars(stream.delivered))
                if chunk.end is not None and chunk.end.error is not None:
                    finish = ERROR
                    raise self._failure(session, chunk.end)
                if chunk.text:
                    self.metrics.generated_chars.inc(len(chunk.text))
                    self.metrics.stream_messages.inc()
                failed_write_back = None
                if write_back is not None and stream.delivered - written_back >= write_back:
                    # A shared store gets the state before the client gets the characters that
                    # would put it `write_back` behind: a crash of this server loses fewer than
                    # that many of the characters the client received.
                    written_back = stream.delivered
                    failed_write_back = await self._checkpoint(session)
                # Counted as delivered already: they go out even when the write-back failed.
                await context.write(response(chunk.text, chunk.end, stream.delivered))
                if failed_write_back is not None:
                    raise failed_write_back
                if chunk.end is not None:
                    finish = chunk.end.finish or ERROR
                    return finish
        finally:
            stream.abort()  # no-op after the end; else the session keeps what was delivered
            self._stream_ended(session, len(job.prompt_tokens) if prompt_chars is None else prompt_chars,
                               stream.delivered, finish, started)

    def _min_chars(self, delivered: int) -> int:
        """Characters a stream's next message waits for (fewer only at its end).

        Each message costs the server and its client about the same CPU time whatever
        it carries, so under load messages should carry more. The first message never
        waits (time to first character); later ones wait for one character per
        `coalesce_streams` streams running, at most half the lookahead. One stream
        alone gets every character at once; 64 streams with --coalesce-streams 4 get
        messages of 16 (below the cap, half the lookahead: 64 by default). Event-driven: the wait ends
        when the engine has handed over enough."""
        if delivered == 0 or self.coalesce_streams <= 0:
            return 1
        return max(1, min(self.active_streams // self.coalesce_streams, self.engine.lookahead // 2))

    async def _checkpoint(self, session: Session) -> ServiceError | None:
        """Write the session back to a shared store; a failure is returned, to raise after the write."""
        try:
            with store_errors():
                await self.store.checkpoint(session)
        except ServiceError as error:
            return error
        return None

    def _stream_ended(self, session: Session, prompt_chars: int, delivered: int, finish: str,
                      started: float) -> None:
        self.metrics.active_streams.dec()
        self.active_streams -= 1
        self.metrics.finished.labels(reason=finish).inc()
        log_event(logger, "generation_finished", session=session.id[:8], reason=finish,
                  prompt_chars=prompt_chars, generated_chars=delivered,
                  seconds=round(time.monotonic() - started, 4))

    def _failure(self, session: Session, event: StreamEvent) -> ServiceError:
        if event.error_is_precondition:
            return ServiceError(grpc.StatusCode.FAILED_PRECONDITION, event.error or "")
        # Internal details (device errors, paths) go to the log, never to the caller.
        log_event(logger, "generation_failed", logging.ERROR, session=session.id[:8], error=event.error)
        return ServiceError(grpc.StatusCode.INTERNAL, "generation failed; the server log has details")
