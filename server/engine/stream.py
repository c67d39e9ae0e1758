"""The caller's side of a generation, on its asyncio loop.

The engine thread posts each step's events to a StreamHub with one
call_soon_threadsafe per step (not per character); the hub routes them to
the GenerationStreams by request id. A stream buffers the characters that
arrived, and `next_chunk()` takes all of them at once (coalescing: a slow
writer gets fewer, larger chunks).

Taking a chunk IS delivery: the characters count as handed to the client
before the caller awaits its write, and the engine is told the new total at
once (`ack`). If the write is then cancelled, the characters were still
delivered (they may have reached the client), so the session keeps them and
never repeats one. When the caller ends early, `abort()` tells the engine
how many characters it delivered; the engine undoes the rest.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Callable

from server.engine.generation import StreamEvent, recent_tail

Settle = Callable[[int, int], None]  # (request id, characters delivered) -> None


@dataclass(frozen=True)
class Chunk:
    text: str  # characters handed over with this chunk (may be empty on the last one)
    end: StreamEvent | None  # the finish (or failure) that ends the stream, if it came


class GenerationStream:
    """One request's events, read on the loop that submitted it."""

    def __init__(self, request_id: int, ack: Settle, abort: Settle):
        self.request_id = request_id
        self._ack, self._abort = ack, abort
        self._text: list[str] = []
        self._opening: StreamEvent | None = None  # accepted, or the refusal
        self._end: StreamEvent | None = None
        self._arrived = asyncio.Event()
        self.delivered = 0  # characters handed to the client
        self.consumed_chars = 0  # the session's, after its prompt and the delivered characters
        self.recent_text = ""
        self.settled = False  # the engine has been told how the stream ended
        # Told the session's consumed count and recent text whenever they change
        # (also after the caller has gone: an abort can overtake the acceptance).
        self.on_update: Callable[[int, str], None] | None = None

    def receive(self, event: StreamEvent) -> None:
        """Engine -> stream, on the loop thread."""
        if event.accepted or event.refused:
            self._opening = event
            self.consumed_chars, self.recent_text = event.consumed_chars, event.recent_text
            if event.accepted:
                self._updated()
        if event.text:
            self._text.append(event.text)
        if event.ends_stream:
            self._end = event
        self._arrived.set()

    async def opening(self) -> StreamEvent:
        """Wait for the engine to accept the request (prompt queued) or refuse it."""
        while self._opening is None:
            self._arrived.clear()
            await self._arrived.wait()
        return self._opening

    async def next_chunk(self) -> Chunk:
        """Wait for characters or the end, then take everything that is ready: delivered from here on."""
        while not self._text and self._end is None:
            self._arrived.clear()
            await self._arrived.wait()
        text = "".join(self._text)
        self._text.clear()
        if text:
            self.delivered += len(text)
            self.consumed_chars += len(text)
            self.recent_text = recent_tail(self.recent_text, text)
            self._updated()
        if text or self._end is not None:
            # With the end, this final ack lets the engine settle the request.
            self._ack(self.request_id, self.delivered)
        if self._end is not None:
            self.settled = True
        return Chunk(text, self._end)

    def _updated(self) -> None:
        if self.on_update is not None:
            self.on_update(self.consumed_chars, self.recent_text)

    def abort(self) -> None:
        """Ending before the stream's end: the session keeps what was delivered, the rest is undone."""
        if not self.settled:
            self.settled = True
            self._abort(self.request_id, self.delivered)


class StreamHub:
    """Routes engine events to the streams of one event loop.

    At most one hand-off is in flight per loop: while the loop has not yet run
    the previous one (it is busy writing), the engine keeps collecting events
    and sends them together later. A busy loop thus gets fewer, larger
    hand-offs, and its streams larger chunks, with no timer involved."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._streams: dict[int, GenerationStream] = {}
        self.in_flight = False  # set by the engine thread when it posts, cleared here when run

    def add(self, stream: GenerationStream) -> None:
        self._streams[stream.request_id] = stream

    def dispatch(self, events: list[tuple[int, StreamEvent]]) -> None:
        """Called on the loop (one call per engine step at most)."""
        self.in_flight = False
        for request_id, event in events:
            stream = self._streams.get(request_id)
            if stream is None:
                continue
            stream.receive(event)
            if event.ends_stream:
                del self._streams[request_id]
