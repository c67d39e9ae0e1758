"""The session RPCs of charstream.v1.Generator: create, describe, reset, delete, list, and
sessions as data (fork, export, import). Streaming lives in service.py.

A session's state leaves the engine only as a SlotSnapshot taken between
steps (engine.snapshot), so a fork or an export is exactly the state after
the session's prompts and delivered characters; records (sessions/record.py)
tie it to the served model.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import time
from typing import Iterator

import grpc

from protos.charstream.v1 import generator_pb2 as pb
from protos.charstream.v1 import generator_pb2_grpc as pb_grpc
from server.api.auth import caller
from server.api.errors import ServiceError
from server.api.validation import (
    Limits,
    check_session_id,
    check_text,
    resolve_settings,
    seed_of,
)
from server.engine.runtime.interface import GenerationEngine
from server.engine.sampling import DEFAULT_SETTINGS
from server.engine.scheduling.slot_state import SlotSnapshot
from server.metrics import ServerMetrics
from server.sessions.backend import SessionBackend
from server.sessions.memory import (
    Session,
    SessionBusy,
    SessionNotFound,
    SessionTakenOver,
    StoreFull,
    StoreUnavailable,
    StreamsFull,
)
from server.sessions.record import (
    MAX_RECORD_BYTES,
    ModelFingerprint,
    RecordInvalid,
    RecordModelMismatch,
    SessionRecord,
    decode_record,
    encode_record,
)
from server.structured_log import log_event

logger = logging.getLogger("charstream.server")
Context = grpc.aio.ServicerContext
IMPORT_COUNTER_LIMIT = 2**61  # imported sessions keep counting: the record format's limits are higher

STORE_ERRORS: tuple[tuple[type[Exception], grpc.StatusCode], ...] = (
    (SessionNotFound, grpc.StatusCode.NOT_FOUND),
    (SessionBusy, grpc.StatusCode.FAILED_PRECONDITION),
    (StoreFull, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (StreamsFull, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (StoreUnavailable, grpc.StatusCode.UNAVAILABLE),
    (SessionTakenOver, grpc.StatusCode.ABORTED),
    (RecordModelMismatch, grpc.StatusCode.FAILED_PRECONDITION),
    (RecordInvalid, grpc.StatusCode.INVALID_ARGUMENT),
)


@contextlib.contextmanager
def store_errors() -> Iterator[None]:
    """Session store and record exceptions as gRPC statuses."""
    try:
        yield
    except tuple(error for error, _ in STORE_ERRORS) as exc:
        code = next(code for error, code in STORE_ERRORS if isinstance(exc, error))
        raise ServiceError(code, str(exc)) from exc


class SessionRPCs(pb_grpc.GeneratorServicer):
    def __init__(self, engine: GenerationEngine, store: SessionBackend, limits: Limits, metrics: ServerMetrics,
                 fingerprint: ModelFingerprint):
        self.engine = engine
        self.store = store
        self.limits = limits
        self.metrics = metrics
        self.fingerprint = fingerprint

    async def CreateSession(self, request: pb.CreateSessionRequest, context: Context) -> pb.CreateSessionResponse:
        settings = resolve_settings(request, DEFAULT_SETTINGS)
        tokens = check_text(self.engine.vocab, request.prompt, self.limits)
        seed = seed_of(request)
        with store_errors():
            session = await self.store.create(
                settings, secrets.randbits(64) if seed is None else seed, tokens, request.prompt, caller()
            )
        log_event(logger, "session_created", session=session.id[:8], prompt_chars=len(tokens))
        return pb.CreateSessionResponse(session_id=session.id, session=self._describe(session))

    async def GetSession(self, request: pb.GetSessionRequest, context: Context) -> pb.GetSessionResponse:
        with store_errors():
            session = await self.store.get(check_session_id(request.session_id), caller())
        return pb.GetSessionResponse(session=self._describe(session))

    async def ResetSession(self, request: pb.ResetSessionRequest, context: Context) -> pb.ResetSessionResponse:
        session_id = check_session_id(request.session_id)
        tokens = check_text(self.engine.vocab, request.prompt, self.limits)
        with store_errors():
            session = await self.store.reset(session_id, seed_of(request), tokens, request.prompt, caller())
        return pb.ResetSessionResponse(session=self._describe(session))

    async def DeleteSession(self, request: pb.DeleteSessionRequest, context: Context) -> pb.DeleteSessionResponse:
        with store_errors():
            await self.store.delete(check_session_id(request.session_id), caller())
        return pb.DeleteSessionResponse()

    async def ListSessions(self, request: pb.ListSessionsRequest, context: Context) -> pb.ListSessionsResponse:
        with store_errors():
            sessions = await self.store.sessions(caller())
        return pb.ListSessionsResponse(
            sessions=[self._describe(s) for s in sessions], max_sessions=self.store.max_sessions
        )

    async def ForkSession(self, request: pb.ForkSessionRequest, context: Context) -> pb.ForkSessionResponse:
        with store_errors():
            source, snapshot, _ = await self._snapshot(check_session_id(request.session_id))
            session = await self.store.create_restored(source.settings, snapshot, caller())
        log_event(logger, "session_forked", session=session.id[:8], source=source.id[:8])
        return pb.ForkSessionResponse(session_id=session.id, session=self._describe(session))

    async def ExportSession(self, request: pb.ExportSessionRequest, context: Context) -> pb.ExportSessionResponse:
        with store_errors():
            session, snapshot, age = await self._snapshot(check_session_id(request.session_id))
        now = time.time()
        record = SessionRecord(self.fingerprint, snapshot, session.settings, created=now - age, updated=now)
        return pb.ExportSessionResponse(state=encode_record(record))

    async def ImportSession(self, request: pb.ImportSessionRequest, context: Context) -> pb.ImportSessionResponse:
        if len(request.state) > MAX_RECORD_BYTES:
            raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"state is {len(request.state)} bytes; a session record is at most {MAX_RECORD_BYTES}")
        with store_errors():
            record = decode_record(request.state, expected=self.fingerprint)
            self._check_imported(record)
            # An imported session belongs to the caller, whoever exported it.
            session = await self.store.create_restored(record.settings, record.snapshot, caller())
        log_event(logger, "session_imported", session=session.id[:8], consumed_chars=session.consumed_chars)
        return pb.ImportSessionResponse(session_id=session.id, session=self._describe(session))

    def _check_imported(self, record: SessionRecord) -> None:
        """This server's limits, which a record made elsewhere (or crafted) could exceed."""
        snapshot = record.snapshot
        if snapshot.position >= IMPORT_COUNTER_LIMIT or snapshot.consumed_chars >= IMPORT_COUNTER_LIMIT:
            # The record format allows up to 2**62 / 2**63: room for the session to keep counting.
            raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT,
                               "the record's counters (position, consumed_chars) are out of range: "
                               f"at most {IMPORT_COUNTER_LIMIT - 1} on import")
        pending = len(record.snapshot.pending)
        if pending > self.limits.max_prompt_chars:
            raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"the record queues {pending} characters; this server takes prompts of at most "
                               f"{self.limits.max_prompt_chars} (--max-prompt-chars)")

    async def _snapshot(self, session_id: str) -> tuple[Session, SlotSnapshot, float]:
        """The session, its state and its age, holding it (busy) while the engine reads the state."""
        session = await self.store.acquire(session_id, caller())
        try:
            return session, await self.engine.snapshot(session.slot), self.store.age_seconds(session)
        except LookupError as exc:  # closed under us (deleted by an operator)
            raise SessionNotFound(f"session {session_id} was closed") from exc
        except ValueError as exc:  # a state lost in a failed step
            raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION, str(exc)) from exc
        finally:
            await self.store.release(session)

    def _describe(self, session: Session) -> pb.SessionInfo:
        idle = self.store.idle_seconds(session)
        return pb.SessionInfo(
            session_id=session.id,
            consumed_chars=session.consumed_chars,
            recent_text=session.recent_text,
            temperature=session.settings.temperature,
            top_k=session.settings.top_k,
            top_p=session.settings.top_p,
            busy=session.busy,
            age_seconds=self.store.age_seconds(session),
            idle_seconds=idle,
            expires_in_seconds=max(0.0, self.store.ttl_seconds - idle),
        )
