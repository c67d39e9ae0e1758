"""Sessions shared by replicas through Redis (--session-store redis://HOST:PORT/DB).

A session lives in Redis as a record (record.py) with a TTL; between
calls it holds no engine slot, so the number of sessions is bounded by Redis
memory, not by --max-sessions (which bounds concurrent calls here). A call:

  1. takes the session's lease (redis_records.py: one holder at a time, with
     an expiry; a second call on any replica is refused as busy) and loads
     the record into a local slot;
  2. streams; every `write_back_chars` delivered characters the state after
     them is written back, checked against the record's version (fencing:
     a replica whose lease lapsed cannot overwrite newer state);
  3. writes the final state back, frees the slot and drops the lease.

A background task renews the leases held here and pings Redis: while Redis is
unreachable, calls fail with UNAVAILABLE and health says NOT_SERVING. If a
replica dies, its leases lapse after --lease-seconds and the sessions continue
anywhere from their last written state, which GetSession describes exactly.
One-shot Generate calls and Converse streams never touch Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from dataclasses import dataclass
from typing import Awaitable, Callable, Iterator

import numpy as np

from server.engine.generation import RECENT_CHARS
from server.engine.runtime.interface import GenerationEngine
from server.engine.sampling import SamplingSettings, stream_key
from server.engine.scheduling.slot_state import SlotSnapshot
from server.sessions.memory import (
    Session,
    SessionBusy,
    SessionNotFound,
    SessionStore,
    SessionTakenOver,
    StoreUnavailable,
)
from server.sessions.record import (
    ModelFingerprint,
    SessionRecord,
    decode_record,
    encode_record,
)
from server.sessions.redis_records import (
    Leased,
    LeaseLost,
    RecordBusy,
    RecordNotFound,
    RecordStoreError,
    RedisRecords,
    RedisUnavailable,
)
from server.structured_log import log_event

logger = logging.getLogger("charstream.server")
LIST_LIMIT = 1000  # ListSessions shows at most this many of a shared store's sessions


@dataclass
class _Hold:
    """A session this replica is advancing: its lease and the version it last wrote."""

    holder: str
    version: int
    created: float  # unix seconds
    owner: str
    lost: bool = False  # renewal found the lease gone


class RedisSessions:
    def __init__(self, records: RedisRecords, local: SessionStore, engine: GenerationEngine, fingerprint: ModelFingerprint,
                 write_back_chars: int, lease_seconds: float):
        self.records = records
        self.local = local  # the slots of sessions in a call here, and of one-shot sessions
        self.engine = engine
        self.fingerprint = fingerprint
        self.max_sessions = local.max_sessions
        self.ttl_seconds = local.ttl_seconds
        self.write_back_chars: int | None = write_back_chars
        self.lease_seconds = lease_seconds
        self._replica = secrets.token_hex(6)  # names this process in lease tokens
        self._held: dict[str, _Hold] = {}

    def __len__(self) -> int:
        return len(self.local)

    @contextlib.contextmanager
    def _errors(self, session_id: str = "") -> Iterator[None]:
        """The record store's errors as the session store's (service.store_errors maps those)."""
        try:
            yield
        except RecordNotFound as exc:
            raise SessionNotFound(
                f"session {session_id} not found in the shared session store: never created, deleted, or "
                f"expired after {self.ttl_seconds:g} s without use; create a new session"
            ) from exc
        except RecordBusy as exc:
            raise SessionBusy(
                f"session {session_id} is busy with another call (on this or another replica); wait for it to "
                "finish or cancel it (calls on one session never interleave)"
            ) from exc
        except LeaseLost as exc:
            raise SessionTakenOver(
                f"this server lost its hold on session {session_id} ({exc}); its last written state stands: "
                "read it with GetSession"
            ) from exc
        except RedisUnavailable as exc:
            raise StoreUnavailable(str(exc)) from exc
        except RecordStoreError as exc:  # Redis answered with an error (read-only replica, out of memory, ...)
            raise StoreUnavailable(str(exc)) from exc

    # ---- sessions at rest: records in Redis ----

    def _fresh(self, seed_key: int, position: int, prompt_tokens: list[int], prompt_text: str) -> SlotSnapshot:
        spec = self.fingerprint
        zeros = np.zeros((spec.num_layers, spec.hidden_size), np.float32)  # [L, H]
        # The prompt waits in the record: the next call consumes it (exactly as it would have here).
        return SlotSnapshot(zeros, None, tuple(prompt_tokens), seed_key, position, len(prompt_tokens),
                            prompt_text[-RECENT_CHARS:])

    async def _store_new(self, settings: SamplingSettings, snapshot: SlotSnapshot, owner: str) -> Session:
        session_id = secrets.token_hex(16)  # 128 random bits
        now = time.time()
        record = SessionRecord(self.fingerprint, snapshot, settings, owner, created=now, updated=now)
        with self._errors(session_id):
            await self.records.create(session_id, encode_record(record))
        return self._view(session_id, record, busy=False)

    async def create(self, settings: SamplingSettings, seed: int, prompt_tokens: list[int],
                     prompt_text: str, owner: str) -> Session:
        return await self._store_new(settings, self._fresh(stream_key(seed), 0, prompt_tokens, prompt_text), owner)

    async def create_restored(self, settings: SamplingSettings, snapshot: SlotSnapshot, owner: str) -> Session:
        return await self._store_new(settings, snapshot, owner)

    async def get(self, session_id: str, owner: str) -> Session:
        with self._errors(session_id):
            data, _, lease_left = await self.records.read(session_id)
        record = self._owned(session_id, data, owner)
        return self._view(session_id, record, busy=lease_left is not None)

    def _owned(self, session_id: str, data: bytes, owner: str) -> SessionRecord:
        """The record, if `owner` owns it; to anyone else it does not exist."""
        record = decode_record(data, self.fingerprint)
        if record.owner != owner:
            with self._errors(session_id):
                raise RecordNotFound(session_id)
        return record

    async def reset(self, session_id: str, seed: int | None, prompt_tokens: list[int], prompt_text: str,
                    owner: str) -> Session:
        holder, leased, old = await self._lease_owned(session_id, owner)
        with self._errors(session_id):
            try:
                key, position = (stream_key(seed), 0) if seed is not None else (
                    old.snapshot.stream_key, old.snapshot.position)
                record = SessionRecord(self.fingerprint, self._fresh(key, position, prompt_tokens, prompt_text),
                                       old.settings, old.owner, old.created, time.time())
                await self.records.write(session_id, holder, leased.version, encode_record(record))
            finally:
                await self.records.release(session_id, holder)
        return self._view(session_id, record, busy=False)

    async def delete(self, session_id: str, owner: str) -> None:
        await self.get(session_id, owner)  # another owner's session does not exist for this caller
        with self._errors(session_id):
            await self.records.delete(session_id)

    async def sessions(self, owner: str) -> list[Session]:
        with self._errors():
            ids = await self.records.scan_ids(LIST_LIMIT)
        views = []
        for session_id in ids:
            with contextlib.suppress(SessionNotFound):  # expired since the scan, or not the caller's
                views.append(await self.get(session_id, owner))
        return sorted(views, key=lambda s: s.last_used, reverse=True)

    def _view(self, session_id: str, record: SessionRecord, busy: bool) -> Session:
        """A session at rest, described by its record (unix times; no slot)."""
        snapshot = record.snapshot
        return Session(session_id, -1, record.settings, created=record.created, last_used=record.updated,
                       consumed_chars=snapshot.consumed_chars, recent_text=snapshot.recent_text, busy=busy)

    # ---- sessions in a call: loaded into a local slot ----

    def _holder(self) -> str:
        return f"{self._replica}:{secrets.token_hex(6)}"

    async def _lease_owned(self, session_id: str, owner: str) -> tuple[str, Leased, SessionRecord]:
        """(holder, lease, record) of `owner`'s session; to anyone else it does not exist."""
        await self.get(session_id, owner)  # first: "busy" would reveal another owner's session
        holder = self._holder()
        with self._errors(session_id):
            leased = await self.records.lease(session_id, holder)
        try:
            return holder, leased, self._owned(session_id, leased.record, owner)
        except BaseException:
            await self._drop_lease(session_id, holder)
            raise

    async def _drop_lease(self, session_id: str, holder: str) -> None:
        with contextlib.suppress(RecordStoreError):  # the original error matters; the lease lapses anyway
            await self.records.release(session_id, holder)

    async def acquire(self, session_id: str, owner: str) -> Session:
        holder, leased, record = await self._lease_owned(session_id, owner)
        try:
            session = self.local.create_restored(record.settings, record.snapshot, session_id=session_id,
                                                 owner=owner)
        except BaseException:
            await self._drop_lease(session_id, holder)
            raise
        session.busy = True
        self._held[session_id] = _Hold(holder, leased.version, record.created, record.owner)
        return session

    async def checkpoint(self, session: Session) -> None:
        """Write the state after the characters delivered so far back to Redis."""
        hold = self._held.get(session.id)
        if hold is None:  # a one-shot session: nothing to keep
            return
        snapshot = await self.engine.snapshot(session.slot)
        record = SessionRecord(self.fingerprint, snapshot, session.settings, hold.owner, hold.created, time.time())
        with self._errors(session.id):
            hold.version = await self.records.write(session.id, hold.holder, hold.version, encode_record(record))

    async def release(self, session: Session) -> None:
        hold = self._held.get(session.id)
        try:
            await self.checkpoint(session)
        finally:
            self._held.pop(session.id, None)
            self.local.discard(session, reason="unloaded")
            if hold is not None:
                with contextlib.suppress(RecordStoreError):  # unreleased, the lease lapses by itself
                    await self.records.release(session.id, hold.holder)

    async def create_ephemeral(self, settings: SamplingSettings, seed: int, prompt_tokens: list[int],
                               prompt_text: str, owner: str) -> Session:
        session = self.local.create(settings, seed, prompt_tokens, prompt_text, owner)
        session.busy = True
        return session

    async def discard(self, session: Session) -> None:
        self.local.discard(session)

    def idle_seconds(self, session: Session) -> float:
        return 0.0 if session.busy else max(0.0, time.time() - session.last_used)

    def age_seconds(self, session: Session) -> float:
        hold = self._held.get(session.id)
        if hold is not None:
            return max(0.0, time.time() - hold.created)
        if session.slot >= 0:  # a one-shot session: local clock
            return self.local.age_seconds(session)
        return max(0.0, time.time() - session.created)

    # ---- background: health and leases ----

    async def run_background(self, set_serving: Callable[[bool], Awaitable[None]]) -> None:
        """Ping Redis and renew the leases held here, forever (cancelled at shutdown). Serving
        means both work: a read-only or full Redis answers PING but cannot keep sessions."""
        period = min(1.0, self.lease_seconds / 3)
        serving = True
        while True:
            try:
                await self.records.ping()
                await self._renew_leases()
                healthy, reason = True, ""
            except Exception as exc:  # noqa: BLE001 - this task must outlive any one failure
                healthy, reason = False, str(exc) or type(exc).__name__
            if healthy != serving:
                serving = healthy
                log_event(logger, "session_store_" + ("reachable" if healthy else "unreachable"),
                          logging.INFO if healthy else logging.ERROR, store=self.records.display_url,
                          **({} if healthy else {"reason": reason}))
                await set_serving(healthy)
            await asyncio.sleep(period)

    async def _renew_leases(self) -> None:
        for session_id, hold in list(self._held.items()):
            renewed = await self.records.renew(session_id, hold.holder)
            if not renewed and not hold.lost:
                hold.lost = True  # the next write-back is refused (fencing) and ends the call
                log_event(logger, "session_lease_lost", logging.WARNING, session=session_id[:8])

    async def close(self) -> None:
        await self.records.close()
