"""The server's side of the engine process's socket: the same interface as loop.Engine.

An EngineClient sends commands to the engine process over a ServerPipe (in the order
they are made, never blocking the caller: process_pipe.py) and reads the engine's
messages on the serving event loop itself (no thread in between), handing events
to each caller's loop hub (stream.py) as the engine thread does. If the engine
goes away, or once the client has stopped, every running stream fails (INTERNAL
for its caller), waiting snapshots fail, and later calls are refused.

Two kinds of server hold one: the server that spawned the engine (EngineProcess,
process.py, link 0) and a front-end process that connected to it
(server/frontends/, `EngineClient.connect`). A front-end's request ids start at
its link index << ID_SHIFT, so the engine knows where their events go.

    client = EngineClient.connect(path)      # a front-end: waits for the engine's greeting
    client.start(); ...; client.stop()
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import socket
import threading
from typing import Any, Callable

import numpy as np

from server.engine.generation import BLOCK, GenerationRequest, StreamEvent
from server.engine.model.vocabulary import Vocabulary
from server.engine.observer import StepObserver
from server.engine.runner.model_runner import RunnerInfo
from server.engine.runtime.child_links import ID_SHIFT
from server.engine.runtime.process_messages import (
    PrefixCacheStats,
    WireEvents,
    replay_observations,
    wire_error,
)
from server.engine.runtime.process_pipe import ServerPipe, run_on_loop
from server.engine.runtime.stream import GenerationStream, StreamHub, StreamHubs
from server.engine.scheduling.slot_state import SlotSnapshot
from server.structured_log import log_event

logger = logging.getLogger("charstream.server")

GONE = "the engine process exited"
CONNECT_TIMEOUT = 30.0  # seconds a front-end waits for the engine's greeting


class EngineClient:
    def __init__(self, pipe: ServerPipe, info: RunnerInfo, lookahead: int, observer: StepObserver | None = None,
                 link: int = 0):
        self._pipe = pipe  # the server's end never blocks (process_pipe.py)
        self.info = info
        self.link = link  # this server's index at the engine (0: the server that spawned it)
        self.vocab = Vocabulary(info.spec.vocab)
        self._wire = WireEvents(self.vocab.chars)
        self.lookahead = lookahead
        self.prefix_cache = PrefixCacheStats()
        self._observer = observer
        self._send_lock = threading.Lock()
        self._acks: dict[int, int] = {}  # request id -> characters delivered, not sent yet
        self._acks_scheduled: set[asyncio.AbstractEventLoop] = set()  # loops with a flush to come
        self._acks_sent: dict[asyncio.AbstractEventLoop, asyncio.Future] = {}  # done once that flush is sent
        self._ids = itertools.count((link << ID_SHIFT) + 1)  # 0 is BLOCK's
        self._hubs = StreamHubs()
        self._routes: dict[int, StreamHub] = {}  # request id -> its caller's hub
        self._snapshots: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Future]] = {}
        self._gone = False
        self._stopping = False
        self.on_gone: Callable[[], None] | None = None  # called on the loop if the engine goes away
        self._loop: asyncio.AbstractEventLoop | None = None  # where the engine's messages are read (start)
        self.on_message: Callable[[tuple[Any, ...]], bool] | None = None  # others' messages (True: taken)
        self.on_closed: Callable[[], None] | None = None  # the link is gone (after the streams failed)

    @classmethod
    def connect(cls, path: str, lookahead: int, observer: StepObserver | None = None,
                timeout: float = CONNECT_TIMEOUT) -> "EngineClient":
        """A front-end's client of the engine listening at `path` (a Unix socket)."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(path)
        except OSError as exc:
            sock.close()
            raise RuntimeError(f"cannot reach the engine process at {path}: {exc}") from exc
        pipe = ServerPipe(sock)
        try:
            kind, info, link = pipe.receive_first(timeout)
        except (TimeoutError, EOFError, OSError, ValueError) as exc:
            pipe.close()
            raise RuntimeError(f"the engine process at {path} did not greet this front-end: {exc}") from exc
        assert kind == "ready"
        return cls(pipe, info, lookahead, observer, link)

    def start(self) -> None:
        """Start taking the child's messages, on the running event loop (call it from there): they
        are read where they are used, with no thread in between."""
        self._loop = asyncio.get_running_loop()
        self._pipe.attach(self._loop, self._on_message, self._child_gone)

    def stop(self, timeout: float = 5.0) -> None:
        """Close the socket (the engine ends this server's streams, keeping what was delivered),
        then fail whatever still waits and refuse later calls. From any thread but the loop's."""
        self._stopping = True
        self._send(None)  # the last acks
        if not run_on_loop(self._loop, self._shut_down, timeout):
            log_event(logger, "engine_stop_unconfirmed", logging.WARNING, timeout_seconds=timeout)

    def _shut_down(self) -> None:
        self._pipe.close()
        self._child_gone()

    def _gone_details(self) -> dict[str, Any]:
        return {"link": self.link}

    def open_slot(self, slot: int, seed: int, prompt_tokens: list[int]) -> None:
        self._send(("open", slot, seed, list(prompt_tokens)))

    def reset_slot(self, slot: int, seed: int | None, prompt_tokens: list[int]) -> None:
        self._send(("reset", slot, seed, list(prompt_tokens)))

    def close_slot(self, slot: int) -> None:
        self._send(("close", slot))

    def restore_slot(self, slot: int, snapshot: SlotSnapshot) -> None:
        self._send(("restore", slot, snapshot))

    async def snapshot(self, slot: int) -> SlotSnapshot:
        """As loop.Engine.snapshot: the state after the prompts and the characters delivered so far."""
        if self._gone:
            raise RuntimeError("the engine is not running")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[SlotSnapshot] = loop.create_future()
        token = next(self._ids)
        self._snapshots[token] = (loop, future)
        try:
            self._send(("snapshot", token, slot))
            return await future
        finally:
            self._snapshots.pop(token, None)

    def submit(self, slot: int, request: GenerationRequest) -> GenerationStream:
        """Start a generation on `slot`, from a coroutine; read its chunks from the returned stream."""
        hub, stream = self._hubs.open_stream(next(self._ids), self.ack, self.abort)
        if self._gone:
            hub.post([(stream.request_id, StreamEvent(error=GONE, refused=True))])
            return stream
        self._routes[stream.request_id] = hub
        self._send(("submit", stream.request_id, slot, request))
        return stream

    def ack(self, request_id: int, delivered: int) -> asyncio.Future | None:
        """Acks made in one pass of the caller's loop travel as one message (one per stream and
        write otherwise: the child would spend more time reading acks than stepping).

        A front-end (link > 0) returns a future that is done once that message is sent, and
        the stream waits for it before the characters are written: the engine outlives a
        front-end that is killed, and the session must then hold every character a client may
        have received. (A single server's engine stops with it: nothing to wait for.)"""
        loop = asyncio.get_running_loop()
        with self._send_lock:
            self._acks[request_id] = delivered
            if loop in self._acks_scheduled:
                return self._acks_sent.get(loop) if self.link else None
            self._acks_scheduled.add(loop)
            sent = self._acks_sent[loop] = loop.create_future() if self.link else None
        loop.call_soon(self._flush_acks, loop)
        return sent

    def _flush_acks(self, loop: asyncio.AbstractEventLoop) -> None:
        with self._send_lock:
            self._acks_scheduled.discard(loop)
            sent = self._acks_sent.pop(loop, None)
        self._send(None)
        if sent is not None and not sent.done():
            sent.set_result(None)

    @property
    def gone(self) -> bool:
        """The engine is unreachable (it exited, or this client stopped): calls are refused."""
        return self._gone

    def send(self, command: tuple[Any, ...]) -> None:
        """A command of another layer's (session_host.py's), in order with the engine's own."""
        self._send(command)

    def abort(self, request_id: int, delivered: int) -> None:
        self._send(("abort", request_id, delivered))

    def drain(self) -> None:
        self._send(("drain",))

    def _send(self, command: tuple[Any, ...] | None) -> None:
        """Send the acks waiting, then `command` (None: only the acks). Commands keep their order;
        nothing here blocks (the pipe queues what the socket does not take)."""
        with self._send_lock:
            acks, self._acks = self._acks, {}
            if self._gone:
                return  # every stream has been failed already; nothing left to tell
            # Two arrays, not a list of pairs: the engine applies its lane's in one array pass.
            messages = [("acks", np.fromiter(acks.keys(), np.int64, len(acks)),
                         np.fromiter(acks.values(), np.int64, len(acks)))] if acks else []
            if command is not None:
                messages.append(command)
            if messages:
                self._pipe.send(*messages)

    # ---- the child's messages, read on the loop ----

    def _on_message(self, message: tuple[Any, ...]) -> None:
        try:
            if self.on_message is not None and self.on_message(message):
                return
            if message[0] == "events":
                self._route(message[1])
                replay_observations(self._observer, self.prefix_cache, message[2], message[3])
            elif message[0] == "snapshot":
                self._settle_snapshot(*message[1:])
        except Exception:  # noqa: BLE001 - the reader must outlive any one message
            logger.exception("engine message failed")

    def _route(self, wire: list[tuple[int, Any]]) -> None:
        """Each event to its stream, in order. A stream on this loop takes its plain text at once,
        with no StreamEvent made (one text per stream and message, a few hundred a message); a
        stream on another loop gets its events posted there, one hand-off per loop."""
        by_hub: dict[StreamHub, list] = {}
        if any(request_id == BLOCK for request_id, _ in wire):
            wire = self._wire.expand_blocks(wire)
        routes, here = self._routes, self._loop
        for request_id, payload in wire:
            hub = routes.get(request_id)
            if hub is None:
                continue
            if hub.loop is here:
                if payload.__class__ is str:
                    hub.receive_text(request_id, payload)
                    continue
                hub.dispatch([(request_id, payload)])
            else:
                event = self._wire.text_event(payload) if isinstance(payload, str) else payload
                by_hub.setdefault(hub, []).append((request_id, event))
                payload = event
            if payload.ends_stream:
                del routes[request_id]
        for hub, events in by_hub.items():
            hub.post(events)

    def _settle_snapshot(self, token: int, result: SlotSnapshot | None,
                         error: tuple[str, str] | Exception | None) -> None:
        if isinstance(error, tuple):  # (kind, message) from the child
            error = wire_error(*error)
        waiting = self._snapshots.get(token)
        if waiting is None:
            return
        loop, future = waiting

        def settle() -> None:
            if future.done():  # the caller gave up waiting
                return
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)

        if loop is self._loop:
            settle()
            return
        try:
            loop.call_soon_threadsafe(settle)
        except RuntimeError:  # the caller's loop is closed
            pass

    def _child_gone(self) -> None:
        """The pipe closed (or the engine stopped): fail every running stream and waiting snapshot;
        refuse later calls. On the loop's thread (or with no loop running)."""
        with self._send_lock:
            already, self._gone = self._gone, True
        if not self._stopping and not already:
            log_event(logger, "engine_process_exited", logging.ERROR, **self._gone_details())
            if self.on_gone is not None:
                try:
                    self.on_gone()
                except RuntimeError:  # the server's loop is closed already
                    pass
        routes, self._routes = self._routes, {}
        by_hub: dict[StreamHub, list] = {}
        for request_id, hub in routes.items():
            by_hub.setdefault(hub, []).append((request_id, StreamEvent(error=GONE)))
        for hub, events in by_hub.items():
            hub.post(events)
        for token in list(self._snapshots):
            self._settle_snapshot(token, None, RuntimeError("the engine is not running"))
        if self.on_closed is not None:
            self.on_closed()
