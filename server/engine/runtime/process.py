"""The engine in a process of its own: the server's side, with the same interface as loop.Engine.

Why a process: in one Python process the engine thread and the gRPC event loop
take turns holding the interpreter lock. The event loop writing messages kept
the engine waiting after every model step, so the engine made about one
character per stream per write and messages stayed one character long. In its
own process the engine steps at the model's speed, characters pile up while
the loop writes, and each write carries all of them (coalescing).

    engine = EngineProcess(params, observer=metrics)   # spawns the child, loads the model there
    engine.info                                         # the child's RunnerInfo
    engine.start(); ...; engine.stop()

Commands go to the child over a socket in the order they are made, never
blocking the caller (process_pipe.py: why); the serving event loop reads the
child's messages itself (no thread in between) and hands events to each
caller's loop hub (stream.py), as the engine thread does. If the child dies,
or once the engine has stopped, every running stream fails (INTERNAL for its
caller), waiting snapshots fail, and later calls are refused.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing
import socket
import threading
from typing import Any, Callable

import numpy as np

from server.engine.generation import BLOCK, GenerationRequest, StreamEvent, merge_blocks
from server.engine.model.vocabulary import Vocabulary
from server.engine.observer import StepObserver
from server.engine.runner.model_runner import RunnerInfo
from server.engine.runtime.process_child import (
    STARTUP_ERRORS,
    EngineParams,
    engine_main,
    wire_error,
)
from server.engine.runtime.process_pipe import ServerPipe, run_on_loop
from server.engine.runtime.stream import GenerationStream, StreamHub, StreamHubs
from server.engine.scheduling.slot_state import SlotSnapshot
from server.structured_log import log_event

logger = logging.getLogger("charstream.server")

START_TIMEOUT = 300.0  # seconds for the child to load the model (a CUDA start can be slow)
STOP_TIMEOUT = 5.0
GONE = "the engine process exited"


class PrefixCacheStats:
    """The child's prefix-cache size, as last reported (metrics read it at scrape time)."""

    bytes = 0
    entries = 0


class EngineProcess:
    def __init__(self, params: EngineParams, observer: StepObserver | None = None,
                 start_timeout: float = START_TIMEOUT):
        context = multiprocessing.get_context("spawn")  # never fork a process that runs gRPC threads
        ours, theirs = socket.socketpair()
        self._process = context.Process(target=engine_main, args=(theirs, params),
                                        name="charstream-engine", daemon=True)
        self._process.start()
        theirs.close()
        self._pipe = ServerPipe(ours)  # the server's end never blocks (process_pipe.py)
        self.info: RunnerInfo = self._wait_ready(start_timeout)
        self.vocab = Vocabulary(self.info.spec.vocab)
        self._chars = np.array(self.vocab.chars)  # token id -> character, for merge_blocks
        self.lookahead = params.lookahead
        self.prefix_cache = PrefixCacheStats()
        self._observer = observer
        self._send_lock = threading.Lock()
        self._acks: dict[int, int] = {}  # request id -> characters delivered, not sent yet
        self._acks_scheduled: set[asyncio.AbstractEventLoop] = set()  # loops with a flush to come
        self._ids = itertools.count(1)
        self._hubs = StreamHubs()
        self._routes: dict[int, StreamHub] = {}  # request id -> its caller's hub
        self._snapshots: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Future]] = {}
        self._text_events: dict[str, StreamEvent] = {}
        self._gone = False
        self._stopping = False
        self.on_gone: Callable[[], None] | None = None  # called on the loop if the child dies
        self._loop: asyncio.AbstractEventLoop | None = None  # where the child's messages are read (start)

    def _wait_ready(self, timeout: float) -> RunnerInfo:
        try:
            reply = self._pipe.receive_first(timeout)
        except TimeoutError:
            self._kill()
            raise RuntimeError(f"the engine process did not load the model within {timeout:.0f} s") from None
        except (EOFError, OSError):
            reply = ("failed", "RuntimeError", f"{GONE} while loading the model (exit code {self._exit_code()})")
        except BaseException:
            self._kill()
            raise
        if reply[0] == "ready":
            return reply[1]
        self._kill()
        _, kind, message = reply
        raise STARTUP_ERRORS.get(kind, RuntimeError)(message)

    def _exit_code(self) -> int | None:
        self._process.join(0.2)
        return self._process.exitcode

    def _kill(self) -> None:
        if self._process.is_alive():
            self._process.kill()
        self._process.join()
        self._pipe.close()

    # ---- caller side: the same as loop.Engine ----

    def start(self) -> None:
        """Start taking the child's messages, on the running event loop (call it from there): they
        are read where they are used, with no thread in between."""
        self._loop = asyncio.get_running_loop()
        self._pipe.attach(self._loop, self._on_message, self._child_gone)

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Stop the child after the step in progress (killed if it does not stop in `timeout`), then
        fail whatever still waits and refuse later calls. From any thread but the loop's once
        started (it waits); never blocked by a full pipe."""
        self._stopping = True
        self._send(("stop",))
        self._process.join(timeout)
        if self._process.is_alive():
            log_event(logger, "engine_process_killed", logging.WARNING, timeout_seconds=timeout)
            self._process.kill()
            self._process.join()
        if not run_on_loop(self._loop, self._shut_down, timeout):
            log_event(logger, "engine_stop_unconfirmed", logging.WARNING, timeout_seconds=timeout)

    def _shut_down(self) -> None:
        self._pipe.close()
        self._child_gone()

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

    def ack(self, request_id: int, delivered: int) -> None:
        """Acks made in one pass of the caller's loop travel as one message (one per stream and
        write otherwise: the child would spend more time reading acks than stepping)."""
        loop = asyncio.get_running_loop()
        with self._send_lock:
            self._acks[request_id] = delivered
            if loop in self._acks_scheduled:
                return
            self._acks_scheduled.add(loop)
        loop.call_soon(self._flush_acks, loop)

    def _flush_acks(self, loop: asyncio.AbstractEventLoop) -> None:
        with self._send_lock:
            self._acks_scheduled.discard(loop)
        self._send(None)

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
            if message[0] == "events":
                self._route(message[1])
                self._observe(message[2], message[3])
            elif message[0] == "snapshot":
                self._settle_snapshot(*message[1:])
        except Exception:  # noqa: BLE001 - the reader must outlive any one message
            logger.exception("engine message failed")

    def _route(self, wire: list[tuple[int, Any]]) -> None:
        by_hub: dict[StreamHub, list] = {}
        if any(request_id == BLOCK for request_id, _ in wire):
            wire = self._expand_blocks(wire)
        for request_id, payload in wire:
            hub = self._routes.get(request_id)
            if hub is None:
                continue
            event = self._text_event(payload) if isinstance(payload, str) else payload
            by_hub.setdefault(hub, []).append((request_id, event))
            if event.ends_stream:
                del self._routes[request_id]
        for hub, events in by_hub.items():
            if hub.loop is self._loop:
                hub.dispatch(events)  # already on its loop
            else:
                hub.post(events)

    def _expand_blocks(self, wire: list[tuple[int, Any]]) -> list[tuple[int, Any]]:
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

    def _text_event(self, text: str) -> StreamEvent:
        event = self._text_events.get(text)
        if event is None:
            event = StreamEvent(text=text)
            if len(text) == 1 and len(self._text_events) < 4096:  # single characters: shared events
                self._text_events[text] = event
        return event

    def _observe(self, observed: list[tuple[Any, ...]], stats: tuple[int, int] | None) -> None:
        if stats is not None:
            self.prefix_cache.bytes, self.prefix_cache.entries = stats
        if self._observer is None:
            return
        for kind, *values in observed:
            if kind == "step":
                self._observer.observe_step(*values)
            elif kind == "lookahead":
                self._observer.observe_lookahead(*values)
            elif kind == "prefix":
                self._observer.observe_prefix_cache(*values, self.prefix_cache)  # type: ignore[arg-type]
            elif kind == "stretch":
                self._observer.observe_stretch(*values)

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
            log_event(logger, "engine_process_exited", logging.ERROR, exit_code=self._exit_code())
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
