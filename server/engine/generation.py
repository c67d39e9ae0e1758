"""One generation request as the engine sees it: what was asked, where it stands, what it emits.

A request moves through one status at a time (RequestStatus), in one place:

    WAITING -> CONSUMING_PROMPT -> GENERATING -> FINISHED_* (length, stop, shutdown, error)
                                              -> ABORTED (its caller ended it first)

The engine thread owns every Request; callers only ever hold its id. What the
engine tells a caller travels as StreamEvents: accepted (with the session's
consumed count and recent text after the prompt), text, finished, refused or
failed.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from server.engine.sampling import SamplingSettings

LENGTH = "length"
STOP = "stop"
CANCELLED = "cancelled"
SHUTDOWN = "shutdown"
ERROR = "error"

RECENT_CHARS = 256  # how much of a session's consumed text GetSession shows


class RequestStatus(enum.Enum):
    WAITING = "waiting"  # accepted; its first model step has not run yet
    CONSUMING_PROMPT = "consuming_prompt"
    GENERATING = "generating"
    FINISHED_LENGTH = LENGTH
    FINISHED_STOP = STOP
    FINISHED_SHUTDOWN = SHUTDOWN
    FINISHED_ERROR = ERROR
    ABORTED = CANCELLED  # the caller ended it (cancel, deadline, disconnect)

    @property
    def is_finished(self) -> bool:
        return self not in (RequestStatus.WAITING, RequestStatus.CONSUMING_PROMPT, RequestStatus.GENERATING)


FINISHED_BY_REASON = {LENGTH: RequestStatus.FINISHED_LENGTH, STOP: RequestStatus.FINISHED_STOP,
                      SHUTDOWN: RequestStatus.FINISHED_SHUTDOWN}


@dataclass(frozen=True)
class GenerationRequest:
    """A validated request: prompt token ids to consume, then up to max_chars characters."""

    prompt_tokens: tuple[int, ...]
    max_chars: int
    settings: SamplingSettings
    seed: int | None = None  # re-seed the session's stream first; None = continue it
    stops: tuple[str, ...] = ()


@dataclass(frozen=True)
class StreamEvent:
    """Engine -> caller. Exactly one of the kinds below, in this order per request:
    accepted, then text*, then one of finished / failed; or refused alone."""

    text: str = ""  # generated characters, in order
    accepted: bool = False
    consumed_chars: int = 0  # with accepted: the session's count after the prompt
    recent_text: str = ""  # with accepted: the session's recent text after the prompt
    finish: str | None = None  # LENGTH, STOP, SHUTDOWN
    matched_stop: str = ""
    error: str | None = None  # refused or failed; the message is for the log or the caller (see below)
    error_is_precondition: bool = False  # the caller can fix it (reset the session); else internal
    refused: bool = False  # never started: its prompt was not consumed
    # Derived once here, not by properties: both are read for every event on the hot paths.
    ends_stream: bool = field(init=False, repr=False, compare=False)  # finished or failed
    is_plain_text: bool = field(init=False, repr=False, compare=False)  # characters and nothing else

    def __post_init__(self) -> None:
        ends = self.finish is not None or self.error is not None
        object.__setattr__(self, "ends_stream", ends)
        object.__setattr__(self, "is_plain_text", bool(self.text) and not ends and not self.accepted)


@dataclass(frozen=True, eq=False)
class CharBlock:
    """Engine -> callers: plain characters of several requests, as arrays: one each (the steady
    lane's draws: steady_lane.py) or, with `several`, any number each, a request's in order (a
    batch's stretch: batch_stretch.py). In an event list it stands where a (request id,
    StreamEvent) pair would, as (0, block); expand_events turns it into those pairs."""

    request_ids: np.ndarray  # [R] int64
    tokens: np.ndarray  # [R] int64 token ids
    several: bool = False  # a request id may repeat: the block is a whole call's characters, sent at once


BLOCK = 0  # the request id a CharBlock travels under in an event list (real ids start at 1)


def expand_events(events: list, text_events: Sequence[StreamEvent]) -> list[tuple[int, StreamEvent]]:
    """(request id, StreamEvent) pairs for an event list that may hold CharBlocks: each block's
    characters as their shared plain text events (text_events[token]), in place of the block."""
    if not any(request_id == BLOCK for request_id, _ in events):
        return events
    out: list[tuple[int, StreamEvent]] = []
    for request_id, event in events:
        if request_id == BLOCK and event.several:  # one text event per request, its characters in order
            texts: dict[int, list[str]] = {}
            for rid, token in zip(event.request_ids.tolist(), event.tokens.tolist()):
                texts.setdefault(rid, []).append(text_events[token].text)
            out += [(rid, StreamEvent(text="".join(parts))) for rid, parts in texts.items()]
        elif request_id == BLOCK:
            out += zip(event.request_ids.tolist(), [text_events[t] for t in event.tokens.tolist()])
        else:
            out.append((request_id, event))
    return out


def merge_blocks(blocks: Sequence[tuple[np.ndarray, np.ndarray]], chars: np.ndarray) -> list[tuple[int, str]]:
    """Consecutive blocks' characters, (request ids [R], tokens [R]) each, as one (request id, text)
    per request in the order they were drawn; `chars` maps token ids to characters ([V] str array).
    A few array operations and one slice per request, whatever the number of characters."""
    ids = np.concatenate([block[0] for block in blocks])  # [N]
    order = np.argsort(ids, kind="stable")  # by request, each request's characters in draw order
    ids = ids[order]
    pieces = chars[np.concatenate([block[1] for block in blocks])[order]].tolist()  # [N] characters
    text = "".join(pieces)
    starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])  # [G] first character of each request
    spans = zip(ids[starts].tolist(), starts.tolist(), np.r_[starts[1:], len(ids)].tolist())
    if len(text) != len(pieces):  # a vocabulary entry of several code points: join per request instead
        return [(request_id, "".join(pieces[a:b])) for request_id, a, b in spans]
    return [(request_id, text[a:b]) for request_id, a, b in spans]


class StopMatcher:
    """Tells when the text generated so far ends with one of the stop strings."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = tuple(s for s in stops if s)
        self._keep = max((len(s) for s in self.stops), default=0)
        self._tail = ""

    def push(self, char: str) -> str | None:
        """Add one generated character; return the stop string it completes, if any."""
        if not self.stops:
            return None
        self._tail = (self._tail + char)[-self._keep :]
        return next((s for s in self.stops if self._tail.endswith(s)), None)


def recent_tail(before: str, added: str) -> str:
    """The last RECENT_CHARS characters of `before + added`."""
    return (before + added)[-RECENT_CHARS:] if added else before
