"""The charstream.v1.Generator servicer: converts messages, validates, streams.

It never calls ONNX Runtime: generation goes through the engine, sessions
through the store. Streams are written with context.write so that a character
is acknowledged (committed to the session's state) only once its message has
been handed to the transport; a cancelled call raises CancelledError at the
await, and the undelivered character is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import secrets
import time
from typing import AsyncIterator, Awaitable, Callable, Iterator

import grpc

from protos.charstream.v1 import generator_pb2 as pb
from protos.charstream.v1 import generator_pb2_grpc as pb_grpc
from server.engine import Engine
from server.errors import ServiceError
from server.generation import CANCELLED, LENGTH, SHUTDOWN, STOP, GenerationEvent, GenerationRequest
from server.metrics import ServerMetrics
from server.sampling import DEFAULT_SETTINGS, SamplingSettings
from server.session_store import Session, SessionBusy, SessionNotFound, SessionStore, StoreFull
from server.structured_log import log_event
from server.validation import (
    Limits,
    check_max_chars,
    check_session_id,
    check_stops,
    check_text,
    resolve_settings,
    seed_of,
)

logger = logging.getLogger("charstream.server")
Context = grpc.aio.ServicerContext

FINISH_REASONS = {
    LENGTH: pb.FINISH_REASON_LENGTH,
    STOP: pb.FINISH_REASON_STOP,
    CANCELLED: pb.FINISH_REASON_CANCELLED,
    SHUTDOWN: pb.FINISH_REASON_SHUTDOWN,
}
ERROR = "error"


@contextlib.contextmanager
def store_errors() -> Iterator[None]:
    """Session store exceptions as gRPC statuses."""
    try:
        yield
    except SessionNotFound as exc:
        raise ServiceError(grpc.StatusCode.NOT_FOUND, str(exc)) from exc
    except SessionBusy as exc:
        raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION, str(exc)) from exc
    except StoreFull as exc:
        raise ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)) from exc


class GeneratorService(pb_grpc.GeneratorServicer):
    def __init__(
        self,
        engine: Engine,
        store: SessionStore,
        limits: Limits,
        metrics: ServerMetrics,
        model_info: pb.GetModelInfoResponse,
    ):
        self.engine = engine
        self.store = store
        self.limits = limits
        self.metrics = metrics
        self.model_info = model_info
        self.shutting_down = asyncio.Event()
        self.active_streams = 0

    # ---- unary RPCs ----

    async def GetModelInfo(
        self, request: pb.GetModelInfoRequest, context: Context
    ) -> pb.GetModelInfoResponse:
        return self.model_info

    async def CreateSession(
        self, request: pb.CreateSessionRequest, context: Context
    ) -> pb.CreateSessionResponse:
        settings = resolve_settings(request, DEFAULT_SETTINGS)
        tokens = check_text(self.engine.vocab, request.prompt, self.limits)
        seed = seed_of(request)
        with store_errors():
            session = self.store.create(settings, secrets.randbits(64) if seed is None else seed, tokens)
        log_event(logger, "session_created", session=session.id[:8], prompt_chars=len(tokens))
        return pb.CreateSessionResponse(session_id=session.id, session=self._describe(session))

    async def GetSession(self, request: pb.GetSessionRequest, context: Context) -> pb.GetSessionResponse:
        with store_errors():
            session = self.store.get(check_session_id(request.session_id))
        return pb.GetSessionResponse(session=self._describe(session))

    async def ResetSession(
        self, request: pb.ResetSessionRequest, context: Context
    ) -> pb.ResetSessionResponse:
        session_id = check_session_id(request.session_id)
        tokens = check_text(self.engine.vocab, request.prompt, self.limits)
        with store_errors():
            session = self.store.reset(session_id, seed_of(request), tokens)
        return pb.ResetSessionResponse(session=self._describe(session))

    async def DeleteSession(
        self, request: pb.DeleteSessionRequest, context: Context
    ) -> pb.DeleteSessionResponse:
        with store_errors():
            self.store.delete(check_session_id(request.session_id))
        return pb.DeleteSessionResponse()

    async def ListSessions(
        self, request: pb.ListSessionsRequest, context: Context
    ) -> pb.ListSessionsResponse:
        return pb.ListSessionsResponse(
            sessions=[self._describe(s) for s in self.store.sessions()], max_sessions=self.store.max_sessions
        )

    def _describe(self, session: Session) -> pb.SessionInfo:
        idle = self.store.idle_seconds(session)
        return pb.SessionInfo(
            session_id=session.id,
            consumed_chars=session.consumed_chars,
            temperature=session.settings.temperature,
            top_k=session.settings.top_k,
            top_p=session.settings.top_p,
            busy=session.busy,
            age_seconds=self.store.age_seconds(session),
            idle_seconds=idle,
            expires_in_seconds=max(0.0, self.store.ttl_seconds - idle),
        )

    # ---- streaming RPCs ----

    async def Generate(self, request: pb.GenerateRequest, context: Context) -> None:
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
                session = self.store.create(DEFAULT_SETTINGS, secrets.randbits(64) if seed is None else seed, [])
                session.busy = True
            else:
                session = self.store.acquire(check_session_id(request.session_id))
        try:
            if session.consumed_chars + len(tokens) == 0:
                raise ServiceError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"session {session.id} has consumed no text yet: send a prompt (at least one character)",
                )
            settings = resolve_settings(request, session.settings)
            job = GenerationRequest(tuple(tokens), max_chars, settings, seed, stops)

            async def write(event: GenerationEvent, generated: int) -> None:
                response = pb.GenerateResponse(text=event.text)
                if event.finish is not None:
                    response.finish_reason = FINISH_REASONS[event.finish]
                    response.generated_chars = generated
                    response.prompt_chars = len(tokens)
                    response.matched_stop = event.matched_stop
                await context.write(response)

            await self._run(session, job, write)
        finally:
            if one_shot:
                self.store.discard(session)
            else:
                self.store.release(session)

    async def Converse(
        self, request_iterator: AsyncIterator[pb.ConverseRequest], context: Context
    ) -> None:
        with store_errors():
            session = self.store.create(DEFAULT_SETTINGS, secrets.randbits(64), [])
        session.busy = True
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
                    message = "the first turn of a conversation needs text"
                    raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT, message)
                job = GenerationRequest(
                    tuple(tokens),
                    max_chars,
                    resolve_settings(message, session.settings),
                    seed_of(message),
                    check_stops(message.stop, self.engine.vocab, self.limits),
                )

                async def write(event: GenerationEvent, generated: int, turn: int = turn) -> None:
                    response = pb.ConverseResponse(text=event.text, turn=turn, session_id=session.id)
                    if event.finish is not None:
                        response.finish_reason = FINISH_REASONS[event.finish]
                        response.generated_chars = generated
                        response.matched_stop = event.matched_stop
                    await context.write(response)

                if await self._run(session, job, write) == SHUTDOWN:
                    return
        finally:
            self.store.discard(session)
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
        # A cancelled task stays pending until it next runs: not done means not read.
        if not reading.done() or reading.cancelled():
            return None
        try:
            return reading.result()
        except StopAsyncIteration:
            return None

    async def _run(
        self, session: Session, job: GenerationRequest, write: Callable[[GenerationEvent, int], Awaitable[None]]
    ) -> str:
        """Stream one generation through `write`; returns its finish reason."""
        handle = self.engine.generate(session.slot, job, asyncio.get_running_loop())
        session.consumed_chars += len(job.prompt_tokens)
        started = time.monotonic()
        finish, generated = CANCELLED, 0
        self.metrics.active_streams.inc()
        self.active_streams += 1
        try:
            while True:
                event = await handle.next_event()
                if event.refused:  # counted above on the assumption that the engine takes it
                    session.consumed_chars -= len(job.prompt_tokens)
                if event.error is not None:
                    finish = ERROR
                    if event.error_is_precondition:
                        raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION, event.error)
                    # Internal details (device errors, paths) go to the log, never to the caller.
                    log_event(logger, "generation_failed", logging.ERROR, session=session.id[:8], error=event.error)
                    raise ServiceError(grpc.StatusCode.INTERNAL, "generation failed; the server log has details")
                await write(event, generated + (1 if event.text else 0))
                if event.text:
                    handle.ack()  # delivered: now part of the session's state
                    generated += 1
                    session.consumed_chars += 1
                    self.metrics.generated_chars.inc()
                if event.finish is not None:
                    finish = event.finish
                    return finish
        finally:
            if finish == CANCELLED:
                handle.cancel()
            self.metrics.active_streams.dec()
            self.active_streams -= 1
            self.metrics.finished.labels(reason=finish).inc()
            log_event(
                logger,
                "generation_finished",
                session=session.id[:8],
                reason=finish,
                prompt_chars=len(job.prompt_tokens),
                generated_chars=generated,
                seconds=round(time.monotonic() - started, 4),
            )
