"""Sessions: id -> (state slot, default settings, timestamps), bounded and expiring.

Used only on the asyncio loop (no locks). The store owns the slot allocator
and tells the engine when a slot opens or closes. Ids are 128 random bits in
hex. Idle sessions expire after the TTL; when the store is full the least
recently used idle session is evicted. Recently expired, evicted and deleted
ids are remembered (a bounded number) so that a late call on one is told why
it is gone instead of "unknown".
"""

from __future__ import annotations

import collections
import re
import secrets
import time
from dataclasses import dataclass
from typing import Callable, Protocol

from server.engine.generation import RECENT_CHARS
from server.engine.runner.state_pool import SlotAllocator
from server.engine.sampling import SamplingSettings
from server.engine.scheduling.slot_state import SlotSnapshot

SESSION_ID_PATTERN = re.compile(r"[0-9a-f]{32}")


class SlotEngine(Protocol):
    def open_slot(self, slot: int, seed: int, prompt_tokens: list[int]) -> None: ...
    def reset_slot(self, slot: int, seed: int | None, prompt_tokens: list[int]) -> None: ...
    def close_slot(self, slot: int) -> None: ...
    def restore_slot(self, slot: int, snapshot: SlotSnapshot) -> None: ...


class SessionNotFound(LookupError):
    """No such live session; the message says whether it expired, was evicted or deleted."""


class SessionBusy(RuntimeError):
    """The session is in use by another call."""


class StoreFull(RuntimeError):
    """Every session is busy, so none can be evicted to make room."""


class StreamsFull(RuntimeError):
    """An API key runs its limit of streams (--max-streams-per-key) already."""


class StoreUnavailable(RuntimeError):
    """A shared session store cannot be reached; the message names it."""


class SessionTakenOver(RuntimeError):
    """This server lost its hold on a session (lease expired) and another may have advanced it."""


@dataclass(eq=False)
class Session:
    id: str
    slot: int
    settings: SamplingSettings
    created: float
    last_used: float
    consumed_chars: int = 0  # prompt + delivered characters in the state
    recent_text: str = ""  # the last of them (generation.RECENT_CHARS at most)
    busy: bool = False
    owner: str = ""  # the API key name that created it ("" without keys): others never see it

    def record(self, consumed_chars: int, recent_text: str) -> None:
        """What the engine reports the state holds (see stream.GenerationStream)."""
        self.consumed_chars, self.recent_text = consumed_chars, recent_text


class SessionStore:
    def __init__(
        self,
        engine: SlotEngine,
        max_sessions: int,
        ttl_seconds: float,
        clock: Callable[[], float] = time.monotonic,
        remember: int = 10_000,
        on_removed: Callable[[str], None] | None = None,
        per_owner_limit: int | None = None,
    ):
        self._engine = engine
        self.max_sessions = max_sessions
        self.ttl_seconds = ttl_seconds
        self._clock = clock
        self._slots = SlotAllocator(max_sessions)
        self._live: collections.OrderedDict[str, Session] = collections.OrderedDict()  # LRU first
        # id -> (owner, why): only its owner is told why a session is gone.
        self._gone: collections.OrderedDict[str, tuple[str, str]] = collections.OrderedDict()
        self.per_owner_limit = per_owner_limit
        self._owned: collections.Counter[str] = collections.Counter()  # live sessions per owner
        self._remember = remember
        self._on_removed = on_removed or (lambda reason: None)

    def __len__(self) -> int:
        return len(self._live)

    def create(self, settings: SamplingSettings, seed: int, prompt_tokens: list[int], prompt_text: str = "",
               owner: str = "") -> Session:
        """A new session (evicting the least recently used idle one when full); `prompt_text`
        is the text of `prompt_tokens`."""
        session = self._new_session(secrets.token_hex(16), settings, len(prompt_tokens), prompt_text[-RECENT_CHARS:],
                                    owner)
        self._engine.open_slot(session.slot, seed, prompt_tokens)
        return session

    def create_restored(self, settings: SamplingSettings, snapshot: SlotSnapshot, session_id: str | None = None,
                        owner: str = "") -> Session:
        """A new session continuing exactly from `snapshot` (fork, import, or a session loaded
        from a shared store under its own id)."""
        if session_id is not None and session_id in self._live:
            raise SessionBusy(f"session {session_id} is already loaded on this server")
        session = self._new_session(session_id or secrets.token_hex(16), settings, snapshot.consumed_chars,
                                    snapshot.recent_text, owner)
        self._engine.restore_slot(session.slot, snapshot)
        return session

    def _new_session(self, session_id: str, settings: SamplingSettings, consumed: int, recent: str,
                     owner: str) -> Session:
        self.expire_idle()
        self._make_room_for(owner)
        slot = self._slots.acquire()
        if slot is None:
            victim = next((s for s in self._live.values() if not s.busy), None)
            if victim is None:
                raise StoreFull(
                    f"all {self.max_sessions} sessions are busy generating; retry later "
                    "or start the server with a larger --max-sessions"
                )
            self._remove(
                victim,
                "evicted",
                f"session {victim.id} was evicted: the server holds at most {self.max_sessions} "
                "sessions and it was the least recently used; create a new session",
            )
            slot = self._slots.acquire()
            assert slot is not None
        now = self._clock()
        session = Session(session_id, slot, settings, created=now, last_used=now, consumed_chars=consumed,
                          recent_text=recent, owner=owner)
        self._live[session_id] = session
        self._owned[owner] += 1
        return session

    def _make_room_for(self, owner: str) -> None:
        """Keep `owner` within its limit: its own least recently used idle session goes first."""
        limit = self.per_owner_limit
        if limit is None or self._owned[owner] < limit:
            return
        victim = next((s for s in self._live.values() if s.owner == owner and not s.busy), None)
        if victim is None:
            raise StoreFull(
                f"API key {owner} holds its limit of {limit} sessions (--max-sessions-per-key) and all are "
                "busy; finish or delete one first"
            )
        self._remove(
            victim,
            "evicted",
            f"session {victim.id} was evicted: API key {owner} may hold at most {limit} sessions "
            "(--max-sessions-per-key) and it was that key's least recently used; create a new session",
        )

    def get(self, session_id: str, owner: str = "") -> Session:
        """The live session of `owner`, or SessionNotFound saying why not (to its owner only: to
        anyone else a session of another owner does not exist). Does not count as use."""
        self.expire_idle()
        session = self._live.get(session_id)
        if session is None or session.owner != owner:
            gone = self._gone.get(session_id)
            raise SessionNotFound(
                gone[1] if session is None and gone is not None and gone[0] == owner
                else f"session {session_id} not found on this server (never created here, "
                "or gone long ago); create one with CreateSession"
            )
        return session

    def loaded(self, session_id: str) -> Session | None:
        """The live session with this id, whoever owns it (the server's own bookkeeping only)."""
        return self._live.get(session_id)

    def acquire(self, session_id: str, owner: str = "") -> Session:
        """Mark the session busy for one call; SessionBusy when another call holds it."""
        session = self.get(session_id, owner)
        if session.busy:
            raise SessionBusy(
                f"session {session_id} is busy with another Generate call; wait for it to "
                "finish or cancel it (calls on one session never interleave)"
            )
        session.busy = True
        self._touch(session)
        return session

    def release(self, session: Session) -> None:
        session.busy = False
        if session.id in self._live:
            self._touch(session)

    def reset(self, session_id: str, seed: int | None, prompt_tokens: list[int], prompt_text: str = "",
              owner: str = "") -> Session:
        session = self.get(session_id, owner)
        if session.busy:
            raise SessionBusy(f"session {session_id} is generating; cancel that call before resetting it")
        session.record(len(prompt_tokens), prompt_text[-RECENT_CHARS:])
        self._touch(session)
        self._engine.reset_slot(session.slot, seed, prompt_tokens)
        return session

    def delete(self, session_id: str, reason: str = "deleted", owner: str = "") -> None:
        session = self.get(session_id, owner)
        if session.busy:
            raise SessionBusy(f"session {session_id} is generating; cancel that call before deleting it")
        self._remove(session, reason, f"session {session_id} was deleted")

    def discard(self, session: Session, reason: str = "closed") -> None:
        """Drop a session its own caller is done with (one-shot and conversation sessions; a
        shared store's session unloaded after its call, reason "unloaded")."""
        if self._live.get(session.id) is session:
            self._remove(session, reason, f"session {session.id} ended with the call that owned it")

    def sessions(self, owner: str | None = None) -> list[Session]:
        """Live sessions (of `owner`, or all when None), most recently used first."""
        self.expire_idle()
        return [s for s in reversed(self._live.values()) if owner is None or s.owner == owner]

    def idle_seconds(self, session: Session) -> float:
        return 0.0 if session.busy else max(0.0, self._clock() - session.last_used)

    def age_seconds(self, session: Session) -> float:
        return max(0.0, self._clock() - session.created)

    def expire_idle(self) -> int:
        """Remove sessions idle longer than the TTL; returns how many."""
        now = self._clock()
        expired = []
        # LRU order is last-use order: stop at the first idle session still within its TTL.
        for session in self._live.values():
            if session.busy:
                continue
            if now - session.last_used <= self.ttl_seconds:
                break
            expired.append(session)
        for session in expired:
            self._remove(
                session,
                "expired",
                f"session {session.id} expired after {self.ttl_seconds:g} s without use; create a new session",
            )
        return len(expired)

    def _touch(self, session: Session) -> None:
        session.last_used = self._clock()
        self._live.move_to_end(session.id)

    def _remove(self, session: Session, reason: str, message: str) -> None:
        del self._live[session.id]
        self._engine.close_slot(session.slot)
        self._slots.release(session.slot)
        self._owned[session.owner] -= 1
        if not self._owned[session.owner]:
            del self._owned[session.owner]
        self._gone[session.id] = (session.owner, message)
        while len(self._gone) > self._remember:
            self._gone.popitem(last=False)
        self._on_removed(reason)
