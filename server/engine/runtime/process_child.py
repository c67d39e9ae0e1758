"""The engine in a process of its own: the child's side (see process.py for the server's side).

The child loads the model, owns the scheduler and runs the same iteration as
the engine thread (loop.run_iteration). It has one thread and no event loop:
between iterations it takes every command the server sent (a poll that does
not wait while there is work, and blocks while there is none), and it sends
each batch of events as one message. Nothing here competes with the server's
gRPC work for a lock: that is the point of the process. Its writes block
when the server is behind; the server's never do (process_pipe.py).

Messages (tuples, framed by process_pipe.py):
  server -> child: ("open", slot, seed, tokens), ("reset", slot, seed, tokens), ("close", slot),
                   ("restore", slot, snapshot), ("submit", request_id, slot, request),
                   ("acks", request ids [N], delivered [N]), ("abort", request_id, delivered), ("drain",),
                   ("snapshot", token, slot), ("stop",)
  child -> server: ("ready", RunnerInfo) or ("failed", error class name, message) first; then
                   ("events", [(request_id, text | StreamEvent) | (BLOCK, (request ids, tokens))],
                   [observation], cache_stats)
                   and ("snapshot", token, SlotSnapshot | None, (error class name, message) | None)
A plain text event travels as its text alone: most events are one character.

With front-ends (server/frontends/), each front-end process is a link of its own
(child_links.py): the same messages, its first one from the child ("ready",
RunnerInfo, link index); "drain" from it drains its own streams, "stop" from it
is ignored, and the engine's observations go to one front-end only.
"""

from __future__ import annotations

import logging
import pickle
import signal
import socket
import time
from typing import Any, Callable, Protocol

import numpy as np

from server.engine.generation import BLOCK, SHUTDOWN, StreamEvent
from server.engine.prefix_cache import PrefixCache
from server.engine.runner.model_runner import load_runner
from server.engine.runtime.child_links import Links, link_of
from server.engine.runtime.loop import command_failed, run_iteration
from server.engine.runtime.process_messages import (
    EngineParams,
    Observations,
    wire_events,
    wire_kind,
)
from server.engine.runtime.process_pipe import ChildPipe
from server.engine.scheduling.scheduler import Scheduler
from server.structured_log import configure_logging, log_event

logger = logging.getLogger("charstream.server")

OBSERVATIONS_HELD = 256  # metric observations the child keeps before sending them without events
FLUSH_INTERVAL = 0.004  # seconds plain characters may wait for the next message (see ChildLoop._flush)


class Extension(Protocol):
    """What a server layer adds to the engine process (server/frontends/ hosts the sessions here):
    commands of its own, taking the link they came from, and word of links that broke."""

    handlers: dict[str, Callable[..., None]]  # command name -> handler(link, *args)

    def on_lost(self, link: int) -> None: ...
    def tick(self) -> None: ...  # now and then, between iterations


# Builds the extension in the child: (scheduler, links, runner info) -> Extension. Picklable (a
# module-level function, or a partial of one): the child is spawned.
MakeExtension = Callable[[Scheduler, Links, Any], Extension]
TICK_SECONDS = 1.0  # how often an extension's tick runs (and the longest the engine waits in a poll)


def engine_main(sock: socket.socket, params: EngineParams, make_extension: MakeExtension | None = None) -> None:
    """The child process's entry point. With `params.listen_path`, server processes (front-ends)
    connect there too; `make_extension` adds the commands that serve them."""
    pipe = ChildPipe(sock)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the server decides
    configure_logging(params.log_format, params.log_level)
    try:
        runner = load_runner(params.model_dir, params.variant, params.device, params.num_slots, params.threads)
        listener = listening_socket(params.listen_path) if params.listen_path else None
    except Exception as exc:  # noqa: BLE001 - every start-up failure goes to the server, which reports it
        pipe.send(("failed", type(exc).__name__, str(exc)))
        return
    cache = PrefixCache(params.prefix_cache_bytes) if params.prefix_cache_bytes > 0 else None
    observations = Observations()
    scheduler = Scheduler(runner, params.max_batch, params.lookahead, observations, cache, params.stretch,
                          params.batch_stretch)
    links = Links(pipe, listener)
    extension = make_extension(scheduler, links, runner.info) if make_extension is not None else None
    pipe.send(("ready", runner.info))
    loop = ChildLoop(links, scheduler, observations, cache, extension, hosted=listener is not None)
    loop.greeting = ("ready", runner.info)
    try:
        loop.run()
    finally:
        links.close()


def listening_socket(path: str) -> socket.socket:
    """The Unix socket front-ends connect to (its folder is the server's, private to its user)."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    return listener


class ChildLoop:
    def __init__(self, links: Links, scheduler: Scheduler, observations: Observations,
                 cache: PrefixCache | None, extension: Extension | None = None, hosted: bool = False):
        self.links = links
        self.scheduler = scheduler
        self.observations = observations
        self.cache = cache
        self.extension = extension
        self.hosted = hosted  # link 0 only starts and stops the engine; front-ends serve the streams
        self.greeting: tuple[Any, ...] = ("ready", None)  # a new link's first message (with its index)
        self.stopping = False
        self._sent_stats: tuple[int, int] | None = None
        self._sent_at = 0.0  # perf_counter of the last message
        self._iteration_seconds = 0.0  # how long the last iteration took
        self._awaiting_first: set[int] = set()  # accepted requests whose first character has not gone
        self._draining: set[int] = set()  # links shutting down: their new requests are refused
        self._handlers: dict[str, Callable[..., None]] = {
            "acks": self._acks, "submit": self._submit, "abort": scheduler.abort, "open": scheduler.open,
            "reset": scheduler.reset, "close": scheduler.close, "restore": scheduler.restore,
        }
        # Commands whose handler takes the link they came from (their answer goes back to it).
        self._linked: dict[str, Callable[..., None]] = {
            "snapshot": self._snapshot, "drain": self._drain, "stop": self._stop,
            **(extension.handlers if extension is not None else {}),
        }

    def run(self) -> None:
        iterations = 0
        timeout = TICK_SECONDS if self.extension is not None else None
        next_tick = 0.0
        while not self.stopping:
            # Block while there is nothing to do (metrics first); otherwise only look.
            idle = not self.scheduler.has_work()
            if idle:
                self._flush(force=True)
            self._receive_all(block=idle, timeout=timeout)
            if self.extension is not None and time.monotonic() >= next_tick:
                next_tick = time.monotonic() + TICK_SECONDS  # a sweep per second, not per iteration
                self.extension.tick()
            if self.stopping or 0 not in self.links.pipes:  # stopped, or the server is gone
                break
            started = time.perf_counter()
            run_iteration(self.scheduler, self._flush)
            self._iteration_seconds = time.perf_counter() - started
            iterations += 1
        log_event(logger, "engine_stopped", iterations=iterations, process="child")

    def _receive_all(self, block: bool, timeout: float | None) -> None:
        links = self.links
        while not self.stopping:
            ready = list(links.readable(block, timeout))
            block = False
            if not ready:
                break
            for index, pipe in ready:
                try:
                    commands = pipe.receive()
                except (EOFError, OSError):  # that server process is gone
                    links.drop(index)
                    continue
                for command in commands:
                    if self.stopping:
                        return
                    self._run_command(index, command)
            self._welcome_and_forget()
        self._welcome_and_forget()

    def _run_command(self, link: int, command: tuple[Any, ...]) -> None:
        try:
            linked = self._linked.get(command[0])
            if linked is not None:
                linked(link, *command[1:])
                return
            handler = self._handlers.get(command[0])
            if handler is None:
                raise ValueError(f"unknown engine command {command[0]!r}")
            handler(*command[1:])
        except Exception as exc:  # noqa: BLE001 - a bad command must not kill the engine
            logger.exception("engine command failed")
            if command[0] == "submit":  # its caller waits for an answer: give it one
                self.scheduler.events.append((command[1], command_failed(exc)))

    def _welcome_and_forget(self) -> None:
        """Greet links that just connected (their index, which numbers their requests); end the
        requests of links that broke, keeping what was delivered, as a disconnect would."""
        links = self.links
        for index in links.accepted:
            links.send(index, (*self.greeting, index))
        links.accepted.clear()
        while links.lost:
            index = links.lost.pop()
            self._draining.discard(index)
            for request_id in [rid for rid in self.scheduler.requests if link_of(rid) == index]:
                self.scheduler.abort(request_id, 0)  # delivered stays what it acknowledged
            self._awaiting_first = {rid for rid in self._awaiting_first if link_of(rid) != index}
            if self.extension is not None:
                self.extension.on_lost(index)

    def _submit(self, request_id: int, slot: int, request: Any) -> None:
        if link_of(request_id) in self._draining:
            self.scheduler.events.append((request_id, StreamEvent(finish=SHUTDOWN, refused=True)))
            return
        self.scheduler.submit(request_id, slot, request)

    def _acks(self, request_ids: np.ndarray, delivered: np.ndarray) -> None:
        self.scheduler.ack_many(request_ids, delivered)

    def _drain(self, link: int) -> None:
        """Link 0 (the server that started the engine): end every stream, refuse new ones. A
        front-end: the same for its own streams alone."""
        if link == 0:
            self.scheduler.drain()
            return
        self._draining.add(link)
        self.scheduler.end_requests([rid for rid in self.scheduler.requests if link_of(rid) == link], SHUTDOWN)

    def _stop(self, link: int) -> None:
        if link == 0:  # a front-end may not stop the engine the others use
            self.stopping = True

    def _snapshot(self, link: int, token: int, slot: int) -> None:
        try:
            result, error = self.scheduler.snapshot(slot), None
        except Exception as exc:  # noqa: BLE001 - every failure goes to the waiting caller
            result, error = None, (wire_kind(exc), str(exc))
        try:
            self.links.send(link, ("snapshot", token, result, error))
        except (pickle.PicklingError, TypeError, AttributeError) as exc:  # the caller must not wait forever
            self.links.send(link, ("snapshot", token, None, ("RuntimeError", f"snapshot could not be sent: {exc}")))

    def _flush(self, force: bool = False) -> None:
        """Send the events collected since the last flush, as one message, with the observations.

        Plain characters wait for the next message while it will still go within
        FLUSH_INTERVAL of the last one: at a batch of one an iteration takes a fraction of
        that, and each message costs the child, the server and the client more CPU than
        a model step of the int8 model, whatever it carries. A request's first character
        never waits (time to first character is what an interactive client feels), nor
        does anything else (an acceptance, a finish), nor anything when the engine is about
        to wait (`force`). Observations alone wait (a prompt being consumed makes one per
        step and no events) until OBSERVATIONS_HELD have piled up or the engine is about to wait."""
        events = self.scheduler.events
        stats = (self.cache.bytes, self.cache.entries) if self.cache is not None else None
        if not events and stats == self._sent_stats and (
                not self.observations.pending or (len(self.observations.pending) < OBSERVATIONS_HELD and not force)):
            return
        now = time.perf_counter()
        # Held only if they will still go within FLUSH_INTERVAL of the last message, taking the
        # next iteration to last as long as the last one: a long step never holds characters.
        plain = all(request_id == BLOCK or event.is_plain_text for request_id, event in events)
        awaiting = self._awaiting_first
        # A stretch's event (several characters from one call) is as large as holding would make it.
        single = plain and all(not event.several if request_id == BLOCK else len(event.text) == 1
                               for request_id, event in events)
        if (not force and single and events and now - self._sent_at + self._iteration_seconds < FLUSH_INTERVAL
                and not (awaiting and any(rid in awaiting for rid, _ in events))):
            return
        self.scheduler.events = []
        observed, self.observations.pending = self.observations.pending, []
        self._sent_stats, self._sent_at = stats, now
        if awaiting or not plain:  # plain characters alone start no request: steady streams skip this
            self._note_first_characters(events)
        self._send_events(wire_events(events), observed, stats)

    def _send_events(self, wire: list, observed: list, stats: tuple[int, int] | None) -> None:
        """Each link its own events; the engine's observations and cache stats to one link only."""
        links = self.links
        observer = links.observer(self.hosted)
        by_link = links.split(wire) if wire else {}
        if observer is not None:
            by_link.setdefault(observer, [])
        for index, events in by_link.items():
            if index == observer:
                links.send(index, ("events", events, observed, stats))
            elif events:
                links.send(index, ("events", events, [], None))

    def _note_first_characters(self, events: list[tuple[int, StreamEvent]]) -> None:
        """Track the accepted requests still waiting for their first character (a short set:
        a request leaves it with its first text or its end)."""
        awaiting = self._awaiting_first
        for request_id, event in events:
            if request_id == BLOCK:  # the lane's characters: never a request's first (steady_lane.py)
                continue
            if event.accepted:
                awaiting.add(request_id)
            elif awaiting and (event.text or event.ends_stream):
                awaiting.discard(request_id)
