"""One generation request as the engine sees it, and the handle its caller streams from.

The engine thread emits one character at a time to a GenerationHandle; the
caller (on the asyncio loop) acknowledges a character once it has handed it
to the client, and only then does the character become part of the
session's state. A character that is cancelled before delivery is dropped
and its random number returned to the session, so the session continues as
if it had never been sampled.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Callable

from server.sampling import SamplingSettings

LENGTH = "length"
STOP = "stop"
CANCELLED = "cancelled"
SHUTDOWN = "shutdown"


@dataclass(frozen=True)
class GenerationRequest:
    """A validated request: prompt token ids to consume, then up to max_chars characters."""

    prompt_tokens: tuple[int, ...]
    max_chars: int
    settings: SamplingSettings
    seed: int | None = None  # re-seed the session's stream first; None = continue it
    stops: tuple[str, ...] = ()


@dataclass(frozen=True)
class GenerationEvent:
    """A character (text) and/or the end of the generation (finish)."""

    text: str = ""
    finish: str | None = None  # LENGTH, STOP, SHUTDOWN; None while more follow
    matched_stop: str = ""
    error: str | None = None  # the generation could not run; finish is None
    # True when the caller can fix the error (reset the session); False for internal failures.
    error_is_precondition: bool = False
    # True when the engine never started the request: its prompt was not consumed.
    refused: bool = False


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


class GenerationHandle:
    """Caller's side of a generation, used on the asyncio loop that created it."""

    def __init__(self, loop: asyncio.AbstractEventLoop, submit: Callable[[Callable[[], None]], None]):
        self.loop = loop
        self._submit = submit  # runs a callable on the engine thread, in order
        self._events: asyncio.Queue[GenerationEvent] = asyncio.Queue()
        self.job: Job | None = None
        self.finished = False

    async def next_event(self) -> GenerationEvent:
        event = await self._events.get()
        if event.finish is not None or event.error is not None:
            self.finished = True
        return event

    def deliver(self, event: GenerationEvent) -> None:
        """Engine -> loop (called on the loop thread via call_soon_threadsafe)."""
        self._events.put_nowait(event)

    def ack(self) -> None:
        """The last character was handed to the client: commit it to the session's state."""
        job = self.job
        self._submit(lambda: job.engine_ack(job))  # type: ignore[union-attr]

    def cancel(self) -> None:
        """Stop generating; an undelivered character is dropped. Safe to call more than once."""
        job = self.job
        self._submit(lambda: job.engine_cancel(job))  # type: ignore[union-attr]


@dataclass(eq=False)
class Job:
    """Engine-side state of one generation (touched only on the engine thread)."""

    slot: int
    request: GenerationRequest
    handle: GenerationHandle
    engine_ack: Callable[["Job"], None]
    engine_cancel: Callable[["Job"], None]
    matcher: StopMatcher = field(init=False)
    produced: int = 0
    awaiting_ack: bool = False
    in_flight_token: int = -1
    in_flight_uniform: float | None = None
    done: bool = False

    def __post_init__(self) -> None:
        self.matcher = StopMatcher(self.request.stops)
