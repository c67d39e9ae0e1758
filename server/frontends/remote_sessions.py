"""A front-end's session backend: the sessions live in the engine process (session_host.py).

Every operation is one message over the front-end's engine link and its answer,
awaited on the serving loop; errors come back by name and are raised as the
store's own exceptions, so the servicer maps them to gRPC statuses as it
always does. The Session objects are copies: the servicer updates its copy
while it streams (stream.on_update), and `release` sends the final counts (the
engine settles them against its own: session_host.py).

A session this front-end is streaming is answered from its live copy (a GetSession
during the stream sees the characters delivered so far); another front-end's
GetSession sees where it stood when the call began, until the call ends.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Awaitable, Callable
from typing import Any

from server.engine.runtime.engine_client import EngineClient
from server.engine.sampling import SamplingSettings
from server.engine.scheduling.slot_state import SlotSnapshot
from server.frontends.session_host import HOST_ERRORS
from server.sessions.memory import Session, StoreUnavailable

GONE = "the engine process is not running: the server is restarting or broken; retry later"


class RemoteSessions:
    write_back_chars = None  # the state stays in the engine's slot: nothing to write back

    def __init__(self, engine: EngineClient, max_sessions: int, ttl_seconds: float,
                 streams_per_key: int | None = None):
        self.engine = engine
        self.max_sessions = max_sessions
        self.ttl_seconds = ttl_seconds
        self.streams_per_key = streams_per_key  # counted by the engine over every front-end
        # The engine's session count and removals by reason, as last heard (only the front-end that
        # reports the engine's metrics hears them: session_host.py).
        self.live_count = 0
        self.removed: dict[str, int] = {}
        self._tokens = itertools.count(1)
        self._waiting: dict[int, asyncio.Future] = {}
        self._streaming: dict[str, Session] = {}  # sessions this front-end's calls hold
        engine.on_message = self._on_message
        self.on_counts: Callable[[int, dict[str, int]], None] = lambda live, removed: None

    def __len__(self) -> int:
        return self.live_count

    # ---- the engine's answers (on the serving loop) ----

    def _on_message(self, message: tuple[Any, ...]) -> bool:
        if message[0] == "session_counts":  # this front-end reports the engine's metrics
            _, self.live_count, self.removed = message
            self.on_counts(self.live_count, self.removed)
            return True
        if message[0] != "session":
            return False
        _, token, result, error = message
        future = self._waiting.pop(token, None)
        if future is not None and not future.done():
            if error is not None:
                kind, text = error
                future.set_exception(HOST_ERRORS.get(kind, RuntimeError)(text))
            else:
                future.set_result(result)
        return True

    def fail_all(self) -> None:
        """The engine is gone: every operation waiting fails (called when the link breaks)."""
        waiting, self._waiting = self._waiting, {}
        for future in waiting.values():
            if not future.done():
                future.set_exception(StoreUnavailable(GONE))

    async def _ask(self, operation: str, *args: Any, undo: Callable[[Any], None] | None = None) -> Any:
        """The engine's answer to one operation. `undo`: what to do with its result if the caller
        is cancelled while waiting (the engine carries the operation out all the same)."""
        if self.engine.gone:
            raise StoreUnavailable(GONE)
        token = next(self._tokens)
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        self._waiting[token] = future
        self.engine.send(("session", token, operation, args))
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            if undo is not None:
                future.add_done_callback(lambda done: undo(done.result())
                                         if not done.cancelled() and done.exception() is None else None)
            raise

    def _tell(self, operation: str, *args: Any) -> None:
        """An operation whose answer nobody waits for (an undo)."""
        if not self.engine.gone:
            self.engine.send(("session", next(self._tokens), operation, args))

    # ---- SessionBackend ----

    async def create(self, settings: SamplingSettings, seed: int, prompt_tokens: list[int],
                     prompt_text: str, owner: str) -> Session:
        return await self._ask("create", settings, seed, list(prompt_tokens), prompt_text, owner)

    async def create_ephemeral(self, settings: SamplingSettings, seed: int, prompt_tokens: list[int],
                               prompt_text: str, owner: str) -> Session:
        session = await self._ask("create_ephemeral", settings, seed, list(prompt_tokens), prompt_text, owner,
                                  undo=lambda made: self._tell("discard", made.id))
        self._streaming[session.id] = session
        return session

    async def create_restored(self, settings: SamplingSettings, snapshot: SlotSnapshot, owner: str) -> Session:
        return await self._ask("create_restored", settings, snapshot, owner)

    async def get(self, session_id: str, owner: str) -> Session:
        session = await self._ask("get", session_id, owner)
        return self._streaming.get(session_id, session)

    async def acquire(self, session_id: str, owner: str) -> Session:
        session = await self._ask("acquire", session_id, owner, undo=lambda held: self._tell(
            "release", held.id, held.consumed_chars, held.recent_text))
        self._streaming[session.id] = session
        return session

    async def checkpoint(self, session: Session) -> None:
        return None

    async def release(self, session: Session) -> None:
        self._streaming.pop(session.id, None)
        session.busy = False
        session.last_used = time.monotonic()
        await self._ask("release", session.id, session.consumed_chars, session.recent_text)

    async def reset(self, session_id: str, seed: int | None, prompt_tokens: list[int], prompt_text: str,
                    owner: str) -> Session:
        return await self._ask("reset", session_id, seed, list(prompt_tokens), prompt_text, owner)

    async def delete(self, session_id: str, owner: str) -> None:
        await self._ask("delete", session_id, owner)

    async def discard(self, session: Session) -> None:
        self._streaming.pop(session.id, None)
        await self._ask("discard", session.id)

    async def sessions(self, owner: str) -> list[Session]:
        found = await self._ask("sessions", owner)
        return [self._streaming.get(session.id, session) for session in found]

    async def take_stream(self, key: str) -> None:
        await self._ask("take_stream", key, undo=lambda _: self._tell("give_stream", key))

    async def give_stream(self, key: str) -> None:
        await self._ask("give_stream", key)

    # Both processes read the same clock: time.monotonic is the machine's (CLOCK_MONOTONIC).
    def idle_seconds(self, session: Session) -> float:
        return 0.0 if session.busy else max(0.0, time.monotonic() - session.last_used)

    def age_seconds(self, session: Session) -> float:
        return max(0.0, time.monotonic() - session.created)

    async def run_background(self, set_serving: Callable[[bool], Awaitable[None]]) -> None:
        """Nothing to sweep here: the engine expires idle sessions (session_host.py)."""
        await asyncio.Event().wait()

    async def close(self) -> None:
        self.fail_all()
