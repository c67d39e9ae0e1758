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
"""

from __future__ import annotations

import logging
import pickle
import select
import signal
import socket
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from server.engine.generation import BLOCK, StreamEvent
from server.engine.model.model_dir import ModelDirError
from server.engine.model.providers import DeviceError, ThreadSettings
from server.engine.prefix_cache import PrefixCache
from server.engine.runner.model_runner import load_runner
from server.engine.runtime.loop import command_failed, run_iteration
from server.engine.runtime.process_pipe import ChildPipe
from server.engine.scheduling.batch_stretch import DEFAULT_BATCH_STRETCH
from server.engine.scheduling.scheduler import Scheduler
from server.structured_log import configure_logging, log_event

logger = logging.getLogger("charstream.server")

OBSERVATIONS_HELD = 256  # metric observations the child keeps before sending them without events
FLUSH_INTERVAL = 0.004  # seconds plain characters may wait for the next message (see ChildLoop._flush)
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


def engine_main(sock: socket.socket, params: EngineParams) -> None:
    """The child process's entry point."""
    pipe = ChildPipe(sock)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the server decides
    configure_logging(params.log_format, params.log_level)
    try:
        runner = load_runner(params.model_dir, params.variant, params.device, params.num_slots, params.threads)
    except Exception as exc:  # noqa: BLE001 - every start-up failure goes to the server, which reports it
        pipe.send(("failed", type(exc).__name__, str(exc)))
        return
    cache = PrefixCache(params.prefix_cache_bytes) if params.prefix_cache_bytes > 0 else None
    observations = Observations()
    scheduler = Scheduler(runner, params.max_batch, params.lookahead, observations, cache, params.stretch,
                          params.batch_stretch)
    pipe.send(("ready", runner.info))
    ChildLoop(pipe, scheduler, observations, cache).run()


class ChildLoop:
    def __init__(self, pipe: ChildPipe, scheduler: Scheduler, observations: Observations,
                 cache: PrefixCache | None):
        self.pipe = pipe
        self.scheduler = scheduler
        self.observations = observations
        self.cache = cache
        self.stopping = False
        self._sent_stats: tuple[int, int] | None = None
        self._sent_at = 0.0  # perf_counter of the last message
        self._iteration_seconds = 0.0  # how long the last iteration took
        self._awaiting_first: set[int] = set()  # accepted requests whose first character has not gone
        self._handlers: dict[str, Callable[..., None]] = {
            "acks": self._acks, "submit": scheduler.submit, "abort": scheduler.abort, "open": scheduler.open,
            "reset": scheduler.reset, "close": scheduler.close, "restore": scheduler.restore,
            "drain": scheduler.drain, "snapshot": self._snapshot, "stop": self._stop,
        }
        # One poll object for the pipe: Connection.poll builds a selector on every call, which
        # costs more than a whole iteration of a small model.
        self._poller = select.poll()
        self._poller.register(pipe.fileno(), select.POLLIN)

    def _readable(self, block: bool) -> bool:
        """Whether a command (or the end of the pipe) is waiting; `block`: wait until one is."""
        return bool(self._poller.poll(None if block else 0))

    def run(self) -> None:
        iterations = 0
        while not self.stopping:
            try:
                # Block while there is nothing to do (metrics first); otherwise only look.
                idle = not self.scheduler.has_work()
                if idle:
                    self._flush(force=True)
                if self._readable(block=idle):
                    self._receive_all()
            except (EOFError, OSError):  # the server is gone: nothing left to serve
                break
            if self.stopping:
                break
            started = time.perf_counter()
            run_iteration(self.scheduler, self._flush)
            self._iteration_seconds = time.perf_counter() - started
            iterations += 1
        log_event(logger, "engine_stopped", iterations=iterations, process="child")

    def _receive_all(self) -> None:
        while not self.stopping and self._readable(block=False):
            for command in self.pipe.receive():
                if self.stopping:
                    return
                try:
                    self._apply(command)
                except Exception as exc:  # noqa: BLE001 - a bad command must not kill the engine
                    logger.exception("engine command failed")
                    if command[0] == "submit":  # its caller waits for an answer: give it one
                        self.scheduler.events.append((command[1], command_failed(exc)))

    def _apply(self, command: tuple[Any, ...]) -> None:
        handler = self._handlers.get(command[0])
        if handler is None:
            raise ValueError(f"unknown engine command {command[0]!r}")
        handler(*command[1:])

    def _acks(self, request_ids: np.ndarray, delivered: np.ndarray) -> None:
        self.scheduler.ack_many(request_ids, delivered)

    def _stop(self) -> None:
        self.stopping = True

    def _snapshot(self, token: int, slot: int) -> None:
        try:
            result, error = self.scheduler.snapshot(slot), None
        except Exception as exc:  # noqa: BLE001 - every failure goes to the waiting caller
            result, error = None, (wire_kind(exc), str(exc))
        try:
            self.pipe.send(("snapshot", token, result, error))
        except (pickle.PicklingError, TypeError, AttributeError) as exc:  # the caller must not wait forever
            self.pipe.send(("snapshot", token, None, ("RuntimeError", f"snapshot could not be sent: {exc}")))

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
        self.pipe.send(("events", wire_events(events), observed, stats))

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
