"""What travels between the server and its engine process besides commands: the engine's
parameters, its events as they go on the wire, its metric observations, and failures by name.
See process_child.py for the messages themselves."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from server.engine.generation import BLOCK, StreamEvent, merge_blocks
from server.engine.model.model_dir import ModelDirError
from server.engine.model.providers import DeviceError, ThreadSettings
from server.engine.observer import StepObserver
from server.engine.prefix_cache import PrefixCache
from server.engine.scheduling.batch_stretch import DEFAULT_BATCH_STRETCH

STARTUP_ERRORS = {"ModelDirError": ModelDirError, "DeviceError": DeviceError}
# What a snapshot's failure means to its caller (session_rpcs.py): closed, lost; anything else is internal.
SNAPSHOT_ERRORS: dict[str, type[Exception]] = {"LookupError": LookupError, "ValueError": ValueError}


def wire_events(events: list) -> list[tuple[int, Any]]:
    """An event list as it travels to the server: a plain text event as its text alone, a CharBlock
    (the steady lane's characters) as (BLOCK, (request ids, tokens)), two arrays for any number of
    rows; anything else as the StreamEvent itself."""
    return [(request_id, (event.request_ids, event.tokens) if request_id == BLOCK
             else event.text if event.is_plain_text else event) for request_id, event in events]


def wire_kind(exc: Exception) -> str:
    return next((kind for kind, cls in SNAPSHOT_ERRORS.items() if isinstance(exc, cls)), type(exc).__name__)


def wire_error(kind: str, message: str) -> Exception:
    """A snapshot failure from the child as the exception the engine thread would raise (it travels
    as its class name and message: any exception pickles that way, and unpickles)."""
    return SNAPSHOT_ERRORS.get(kind, RuntimeError)(message)


@dataclass(frozen=True)
class EngineParams:
    """Everything the child needs to build its engine (picklable)."""

    model_dir: str
    variant: str | None
    device: str
    num_slots: int
    threads: ThreadSettings
    max_batch: int
    lookahead: int
    prefix_cache_bytes: int
    log_format: str = "kv"
    log_level: str = "info"
    stretch: bool = True
    batch_stretch: int = DEFAULT_BATCH_STRETCH
    listen_path: str | None = None  # a Unix socket for front-end processes (server/frontends/)


class Observations:
    """The scheduler's StepObserver in the child: observations collected for the next message."""

    def __init__(self) -> None:
        self.pending: list[tuple[Any, ...]] = []

    def observe_step(self, batch_size: int, seconds: float) -> None:
        self.pending.append(("step", batch_size, seconds))

    def observe_lookahead(self, total: int, most: int) -> None:
        self.pending.append(("lookahead", total, most))

    def observe_prefix_cache(self, hit: bool, skipped_chars: int, cache: PrefixCache) -> None:
        self.pending.append(("prefix", hit, skipped_chars))

    def observe_stretch(self, sampled: int, kept: int) -> None:
        self.pending.append(("stretch", sampled, kept))


class WireEvents:
    """The server's side of wire_events: what arrived back as (request id, StreamEvent) pairs."""

    def __init__(self, chars: Sequence[str]):
        self._chars = np.array(chars)  # token id -> character, for merge_blocks
        self._text_events: dict[str, StreamEvent] = {}

    def expand_blocks(self, wire: list[tuple[int, Any]]) -> list[tuple[int, Any]]:
        """The lane's blocks (BLOCK, (request ids, tokens)) as (request id, text): each run of
        consecutive blocks (a message holds an iteration's, or several held ones) as one text
        per request, so a stream takes one event per message, not one per character."""
        out: list[tuple[int, Any]] = []
        run: list[tuple[np.ndarray, np.ndarray]] = []
        for request_id, payload in wire:
            if request_id == BLOCK:
                run.append(payload)
                continue
            if run:
                out += merge_blocks(run, self._chars)
                run = []
            out.append((request_id, payload))
        if run:
            out += merge_blocks(run, self._chars)
        return out

    def text_event(self, text: str) -> StreamEvent:
        event = self._text_events.get(text)
        if event is None:
            event = StreamEvent(text=text)
            if len(text) == 1 and len(self._text_events) < 4096:  # single characters: shared events
                self._text_events[text] = event
        return event


class PrefixCacheStats:
    """The engine's prefix-cache size, as last reported (metrics read it at scrape time)."""

    bytes = 0
    entries = 0


def replay_observations(observer: StepObserver | None, cache: PrefixCacheStats, observed: list[tuple[Any, ...]],
                        stats: tuple[int, int] | None) -> None:
    """The child's observations, made again on the server's observer (its metrics)."""
    if stats is not None:
        cache.bytes, cache.entries = stats
    if observer is None:
        return
    for kind, *values in observed:
        if kind == "step":
            observer.observe_step(*values)
        elif kind == "lookahead":
            observer.observe_lookahead(*values)
        elif kind == "prefix":
            observer.observe_prefix_cache(*values, cache)  # type: ignore[arg-type]
        elif kind == "stretch":
            observer.observe_stretch(*values)
