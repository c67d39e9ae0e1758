"""The caller's side of a generation, on its asyncio loop.

The engine posts each iteration's events to a StreamHub, which wakes its loop
with at most one call_soon_threadsafe outstanding (not one per character or
step); the hub routes them to the GenerationStreams by request id. A stream buffers the characters that
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
import threading
import weakref
from dataclasses import dataclass
from typing import Any, Callable

from server.engine.generation import StreamEvent, recent_tail

Settle = Callable[[int, int], Any]  # (request id, characters delivered) -> None, or an awaitable to wait for


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
        self._ready = 0  # characters in _text
        self._opening: StreamEvent | None = None  # accepted, or the refusal
        self._end: StreamEvent | None = None
        self._arrived = asyncio.Event()
        # Characters the reader waits for (next_chunk's min_chars): text wakes it only once that many
        # are ready. Waking a coroutine costs more than the event itself, and under load a message
        # gathers the characters of many events.
        self._wanted = 1
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
            self._ready += len(event.text)
        if event.ends_stream:
            self._end = event
        if self._ready >= self._wanted or event.ends_stream or event.accepted or event.refused:
            self._arrived.set()

    def receive_text(self, text: str) -> None:
        """Engine -> stream, on the loop thread: characters and nothing else (receive's plain case)."""
        self._text.append(text)
        self._ready += len(text)
        if self._ready >= self._wanted:
            self._arrived.set()

    async def opening(self) -> StreamEvent:
        """Wait for the engine to accept the request (prompt queued) or refuse it."""
        while self._opening is None:
            self._arrived.clear()
            await self._arrived.wait()
        return self._opening

    async def next_chunk(self, min_chars: int = 1) -> Chunk:
        """Wait for at least `min_chars` characters (fewer when the stream ends first), then take
        everything that is ready: delivered from here on. `min_chars` must not exceed the
        engine's lookahead, which is as far as generation runs ahead of delivery."""
        self._wanted = max(1, min_chars)
        while self._ready < self._wanted and self._end is None:
            self._arrived.clear()
            await self._arrived.wait()
        text = "".join(self._text)
        self._text.clear()
        self._ready = 0
        if text:
            self.delivered += len(text)
            self.consumed_chars += len(text)
            self.recent_text = recent_tail(self.recent_text, text)
            self._updated()
        end = self._end  # as taken with `text`: an end arriving later comes with characters of its own
        if end is not None:
            self.settled = True
        if text or end is not None:
            # With the end, this final ack lets the engine settle the request. An engine that
            # must hear of it before the characters are written says so (engine_client.py).
            sent = self._ack(self.request_id, self.delivered)
            if sent is not None:
                # Shared by every stream acked in the same pass: this call's cancellation must
                # not cancel it for the others.
                await asyncio.shield(sent)
        return Chunk(text, end)

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

    A mailbox: the engine side (any thread) `post`s events; at most one hand-off
    to the loop is outstanding, and everything posted until the loop runs it
    goes with it. A busy loop thus gets fewer, larger hand-offs, and its streams
    larger chunks, with no timer involved."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._streams: dict[int, GenerationStream] = {}
        self._lock = threading.Lock()
        self._posted: list[tuple[int, StreamEvent]] = []  # waiting for the loop (under _lock)
        self._scheduled = False  # a hand-off is outstanding (under _lock)

    def add(self, stream: GenerationStream) -> None:
        self._streams[stream.request_id] = stream

    def post(self, events: list[tuple[int, StreamEvent]]) -> None:
        """Engine side, any thread: queue events; wake the loop unless a wake-up is already pending."""
        with self._lock:
            self._posted.extend(events)
            if self._scheduled:
                return
            self._scheduled = True
        try:
            self.loop.call_soon_threadsafe(self._take_posted)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass

    def _take_posted(self) -> None:
        with self._lock:
            events, self._posted, self._scheduled = self._posted, [], False
        self.dispatch(events)

    def receive_text(self, request_id: int, text: str) -> None:
        """On the loop: characters for one stream (dispatch's plain case, with no event made)."""
        stream = self._streams.get(request_id)
        if stream is not None:
            stream.receive_text(text)

    def dispatch(self, events: list[tuple[int, StreamEvent]]) -> None:
        """On the loop: hand each event to its stream."""
        for request_id, event in events:
            stream = self._streams.get(request_id)
            if stream is None:
                continue
            stream.receive(event)
            if event.ends_stream:
                del self._streams[request_id]


class StreamHubs:
    """One StreamHub per event loop (weakly held: a closed loop's hub goes with it)."""

    def __init__(self) -> None:
        self._hubs: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, StreamHub] = weakref.WeakKeyDictionary()

    def open_stream(self, request_id: int, ack: Settle, abort: Settle) -> tuple[StreamHub, GenerationStream]:
        """A new stream on the running loop's hub (call from a coroutine)."""
        loop = asyncio.get_running_loop()
        hub = self._hubs.get(loop)
        if hub is None:
            hub = self._hubs[loop] = StreamHub(loop)
        stream = GenerationStream(request_id, ack, abort)
        hub.add(stream)
        return hub, stream
