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
