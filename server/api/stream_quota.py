"""--max-streams-per-key: how many Generate calls and Converse streams one API key runs at once.

Counted here for a server whose sessions are its own; asked of the session backend when it
counts over several processes (a front-end's RemoteSessions: the engine process counts for
every front-end, server/frontends/session_host.py).

    quota = StreamQuota(limit, store)     # limit None: no per-key limit (no API keys)
    async with quota.held(key): ...       # RESOURCE_EXHAUSTED when the key runs `limit` already
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import AsyncIterator

import grpc

from server.api.errors import ServiceError
from server.api.session_rpcs import store_errors
from server.sessions.backend import SessionBackend


class StreamQuota:
    def __init__(self, limit: int | None, store: SessionBackend):
        self.limit = limit
        self._store = store
        self._running: collections.Counter[str] = collections.Counter()  # key -> streams here

    @contextlib.asynccontextmanager
    async def held(self, key: str) -> AsyncIterator[None]:
        """One stream of `key` for the duration of the block."""
        shared = getattr(self._store, "take_stream", None) if self.limit is not None else None
        if shared is not None:
            with store_errors():
                await shared(key)
            try:
                yield
            finally:
                with contextlib.suppress(RuntimeError):  # the engine is gone (StoreUnavailable): nothing to count
                    await self._store.give_stream(key)  # type: ignore[attr-defined]
            return
        if self.limit is not None and self._running[key] >= self.limit:
            raise ServiceError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"API key {key} already runs {self.limit} streams, its limit (--max-streams-per-key); "
                "wait for one to finish",
            )
        self._running[key] += 1
        try:
            yield
        finally:
            self._running[key] -= 1
            if not self._running[key]:
                del self._running[key]
