"""Sessions in the engine process, for front-ends: any front-end serves any session.

With several gRPC front-end processes, a session cannot live in one of them:
the next call on it may reach another. So the session store (memory.py's
SessionStore, unchanged) runs in the engine process, beside the scheduler it
opens slots in, and front-ends ask it over their engine link (RemoteSessions,
remote_sessions.py): ("session", token, operation, args) in, ("session", token,
result, error) back to the asking link; ("session_counts", live, removed by reason)
to the front-end that reports the engine's metrics, when they change.

The host also remembers which link holds which session (a Generate call's, or a
one-shot call's own), and how many streams each API key runs on each link. When
a front-end's link breaks (the process was killed), the loop has already ended
its requests keeping what was delivered (process_child.py); the host then frees
its sessions, with the counts the scheduler settled, and drops its streams.

    make = functools.partial(session_host, HostSettings(...))   # picklable: the engine is spawned
    EngineProcess(params, make_extension=make)
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, replace
from typing import Any

from server.engine.runtime.child_links import Links
from server.engine.scheduling.scheduler import Scheduler
from server.engine.scheduling.slot_state import SlotSnapshot
from server.sessions.memory import (
    Session,
    SessionBusy,
    SessionNotFound,
    SessionStore,
    StoreFull,
    StreamsFull,
)

# Exceptions a front-end re-raises by name (the servicer maps them to gRPC statuses); anything
# else is a bug, and travels as RuntimeError.
HOST_ERRORS: dict[str, type[Exception]] = {
    "SessionNotFound": SessionNotFound, "SessionBusy": SessionBusy, "StoreFull": StoreFull,
    "StreamsFull": StreamsFull,
}


@dataclass(frozen=True)
class HostSettings:
    """What the store needs, from the server's configuration (picklable)."""

    max_sessions: int
    ttl_seconds: float
    per_owner_limit: int | None
    streams_per_key: int | None


class SchedulerSlots:
    """The store's SlotEngine in the engine process: its commands go straight to the scheduler."""

    def __init__(self, scheduler: Scheduler):
        self._scheduler = scheduler

    def open_slot(self, slot: int, seed: int, prompt_tokens: list[int]) -> None:
        self._scheduler.open(slot, seed, prompt_tokens)

    def reset_slot(self, slot: int, seed: int | None, prompt_tokens: list[int]) -> None:
        self._scheduler.reset(slot, seed, prompt_tokens)

    def close_slot(self, slot: int) -> None:
        self._scheduler.close(slot)

    def restore_slot(self, slot: int, snapshot: SlotSnapshot) -> None:
        self._scheduler.restore(slot, snapshot)


class SessionHost:
    def __init__(self, scheduler: Scheduler, links: Links, settings: HostSettings):
        self._scheduler = scheduler
        self._links = links
        self.settings = settings
        self.removed: collections.Counter[str] = collections.Counter()  # sessions removed, by reason
        self.store = SessionStore(SchedulerSlots(scheduler), settings.max_sessions, settings.ttl_seconds,
                                  on_removed=self._count_removed, per_owner_limit=settings.per_owner_limit)
        self._held: dict[int, dict[str, bool]] = {}  # link -> {session id: one-shot (discard when lost)}
        self._streams: dict[int, collections.Counter[str]] = {}  # link -> API key -> streams running
        self.handlers = {"session": self._session}
        self._published: tuple[int, tuple[int, dict[str, int]]] | None = None  # (link, counts) sent last

    def _count_removed(self, reason: str) -> None:
        self.removed[reason] += 1

    # ---- the loop's hooks (process_child.Extension) ----

    def tick(self) -> None:
        self.store.expire_idle()
        self._publish()

    def on_lost(self, link: int) -> None:
        """A front-end is gone: its sessions are free again, holding what was delivered."""
        for session_id, one_shot in self._held.pop(link, {}).items():
            session = self.store.loaded(session_id)
            if session is None:
                continue
            if one_shot:
                self.store.discard(session)
                continue
            self._settle_counts(session)
            self.store.release(session)
        self._streams.pop(link, None)
        self._published = None  # the observer may be another front-end now
        self._publish()

    # ---- operations ----

    def _session(self, link: int, token: int, operation: str, args: tuple[Any, ...]) -> None:
        try:
            result, error = getattr(self, f"_do_{operation}")(link, *args), None
        except Exception as exc:  # noqa: BLE001 - every failure goes to the caller, by name
            kind = type(exc).__name__
            result, error = None, (kind if kind in HOST_ERRORS else "RuntimeError", str(exc))
        self._links.send(link, ("session", token, result, error))
        self._publish()

    def _publish(self) -> None:
        """The session count and removals, to the front-end that reports the engine's metrics
        (the others report none, so that the merged /metrics counts them once), when they change."""
        observer = self._links.observer(hosted=True)
        counts = (len(self.store), dict(self.removed))
        if observer is not None and (observer, counts) != self._published:
            self._published = (observer, counts)
            self._links.send(observer, ("session_counts", *counts))

    def _hold(self, link: int, session: Session, one_shot: bool) -> Session:
        self._held.setdefault(link, {})[session.id] = one_shot
        return replace(session)  # a copy: the front-end's changes come back by message

    def _release_hold(self, link: int, session_id: str) -> None:
        self._held.get(link, {}).pop(session_id, None)

    def _settle_counts(self, session: Session) -> None:
        """The session's counts as the scheduler settled them (after its request ended)."""
        state = self._scheduler.slots.get(session.slot)
        if state is not None and state.request is None:
            session.record(state.consumed, state.recent)

    def _do_create(self, link: int, settings: Any, seed: int, tokens: list[int], text: str, owner: str) -> Session:
        return replace(self.store.create(settings, seed, tokens, text, owner))

    def _do_create_ephemeral(self, link: int, settings: Any, seed: int, tokens: list[int], text: str,
                             owner: str) -> Session:
        session = self.store.create(settings, seed, tokens, text, owner)
        session.busy = True  # its own call holds it until discard
        return self._hold(link, session, one_shot=True)

    def _do_create_restored(self, link: int, settings: Any, snapshot: SlotSnapshot, owner: str) -> Session:
        return replace(self.store.create_restored(settings, snapshot, owner=owner))

    def _do_get(self, link: int, session_id: str, owner: str) -> Session:
        return replace(self.store.get(session_id, owner))

    def _do_acquire(self, link: int, session_id: str, owner: str) -> Session:
        return self._hold(link, self.store.acquire(session_id, owner), one_shot=False)

    def _do_release(self, link: int, session_id: str, consumed: int, recent: str) -> None:
        self._release_hold(link, session_id)
        session = self.store.loaded(session_id)
        if session is not None:
            session.record(consumed, recent)
            self._settle_counts(session)
            self.store.release(session)

    def _do_reset(self, link: int, session_id: str, seed: int | None, tokens: list[int], text: str,
                  owner: str) -> Session:
        return replace(self.store.reset(session_id, seed, tokens, text, owner))

    def _do_delete(self, link: int, session_id: str, owner: str) -> None:
        self.store.delete(session_id, owner=owner)

    def _do_discard(self, link: int, session_id: str) -> None:
        self._release_hold(link, session_id)
        session = self.store.loaded(session_id)
        if session is not None:
            self.store.discard(session)

    def _do_sessions(self, link: int, owner: str) -> list[Session]:
        return [replace(session) for session in self.store.sessions(owner)]

    def _do_take_stream(self, link: int, key: str) -> None:
        """One more stream of `key`, within --max-streams-per-key over every front-end."""
        limit = self.settings.streams_per_key
        running = sum(counts[key] for counts in self._streams.values())
        if limit is not None and running >= limit:
            raise StreamsFull(
                f"API key {key} already runs {limit} streams, its limit (--max-streams-per-key); "
                "wait for one to finish"
            )
        self._streams.setdefault(link, collections.Counter())[key] += 1

    def _do_give_stream(self, link: int, key: str) -> None:
        counts = self._streams.get(link)
        if counts is not None and counts[key] > 0:
            counts[key] -= 1


def session_host(settings: HostSettings, scheduler: Scheduler, links: Links, info: Any) -> SessionHost:
    """The engine's extension that hosts the sessions (process_child.MakeExtension)."""
    return SessionHost(scheduler, links, settings)
