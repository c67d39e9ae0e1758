"""Where sessions live between calls, as the servicer sees it: one async interface, two backends.

- LocalSessions (the default): sessions in this process (memory.py);
  a session keeps its engine slot between calls.
- RedisSessions (redis_store.py): session records in Redis, shared by
  replicas; a session is loaded into a slot when a call starts and written
  back (checkpointed) during and after it.

Either way a call follows the same path: `acquire` (the session is busy and
in an engine slot), stream, `checkpoint` every `write_back_chars` delivered
characters when the backend asks for it, `release`. One-shot Generate calls
and Converse streams use `create_ephemeral`: their sessions never leave the
process.
"""

from __future__ import annotations

import asyncio
from typing import Awaitable, Callable, Protocol

from server.engine.sampling import SamplingSettings
from server.engine.scheduling.slot_state import SlotSnapshot
from server.sessions.memory import Session, SessionStore


class SessionBackend(Protocol):
    max_sessions: int  # most sessions held in engine slots at once
    ttl_seconds: float  # idle sessions expire after this
    write_back_chars: int | None  # checkpoint a stream every this many delivered characters (None: never)

    # `owner`: the caller's API key name ("" without keys). A session of another owner is
    # NOT_FOUND (SessionNotFound), never "forbidden": its existence is not revealed.
    async def create(self, settings: SamplingSettings, seed: int, prompt_tokens: list[int],
                     prompt_text: str, owner: str) -> Session: ...
    async def create_ephemeral(self, settings: SamplingSettings, seed: int, prompt_tokens: list[int],
                               prompt_text: str, owner: str) -> Session: ...
    async def create_restored(self, settings: SamplingSettings, snapshot: SlotSnapshot, owner: str) -> Session: ...
    async def get(self, session_id: str, owner: str) -> Session: ...
    async def acquire(self, session_id: str, owner: str) -> Session: ...
    async def checkpoint(self, session: Session) -> None: ...
    async def release(self, session: Session) -> None: ...
    async def reset(self, session_id: str, seed: int | None, prompt_tokens: list[int], prompt_text: str,
                    owner: str) -> Session: ...
    async def delete(self, session_id: str, owner: str) -> None: ...
    async def discard(self, session: Session) -> None: ...
    async def sessions(self, owner: str) -> list[Session]: ...
    def idle_seconds(self, session: Session) -> float: ...
    def age_seconds(self, session: Session) -> float: ...
    async def run_background(self, set_serving: Callable[[bool], Awaitable[None]]) -> None: ...
    async def close(self) -> None: ...


class LocalSessions:
    """Sessions in this process: the async face of a SessionStore."""

    write_back_chars = None  # the state lives in the slot: nothing to write back

    def __init__(self, store: SessionStore):
        self.store = store
        self.max_sessions = store.max_sessions
        self.ttl_seconds = store.ttl_seconds

    def __len__(self) -> int:
        return len(self.store)

    async def create(self, settings: SamplingSettings, seed: int, prompt_tokens: list[int],
                     prompt_text: str, owner: str) -> Session:
        return self.store.create(settings, seed, prompt_tokens, prompt_text, owner)

    async def create_ephemeral(self, settings: SamplingSettings, seed: int, prompt_tokens: list[int],
                               prompt_text: str, owner: str) -> Session:
        session = self.store.create(settings, seed, prompt_tokens, prompt_text, owner)
        session.busy = True  # its own call holds it until discard
        return session

    async def create_restored(self, settings: SamplingSettings, snapshot: SlotSnapshot, owner: str) -> Session:
        return self.store.create_restored(settings, snapshot, owner=owner)

    async def get(self, session_id: str, owner: str) -> Session:
        return self.store.get(session_id, owner)

    async def acquire(self, session_id: str, owner: str) -> Session:
        return self.store.acquire(session_id, owner)

    async def checkpoint(self, session: Session) -> None:
        return None

    async def release(self, session: Session) -> None:
        self.store.release(session)

    async def reset(self, session_id: str, seed: int | None, prompt_tokens: list[int], prompt_text: str,
                    owner: str) -> Session:
        return self.store.reset(session_id, seed, prompt_tokens, prompt_text, owner)

    async def delete(self, session_id: str, owner: str) -> None:
        self.store.delete(session_id, owner=owner)

    async def discard(self, session: Session) -> None:
        self.store.discard(session)

    async def sessions(self, owner: str) -> list[Session]:
        return self.store.sessions(owner)

    def idle_seconds(self, session: Session) -> float:
        return self.store.idle_seconds(session)

    def age_seconds(self, session: Session) -> float:
        return self.store.age_seconds(session)

    async def run_background(self, set_serving: Callable[[bool], Awaitable[None]]) -> None:
        """Expire idle sessions, forever (cancelled at shutdown)."""
        period = min(30.0, max(0.05, self.ttl_seconds / 4))
        while True:
            await asyncio.sleep(period)
            self.store.expire_idle()

    async def close(self) -> None:
        return None
