"""The engine: one scheduler thread that runs a single batched model step at a time.

Each iteration:
  1. apply the commands callers queued (open/reset/close slots, start, ack,
     cancel): requests join and leave only between steps;
  2. sample a character for every generation whose session has logits ready
     and whose previous character has been acknowledged, and emit it;
  3. run ONE step for every slot with tokens waiting to be consumed (prompt
     characters and delivered characters), up to max_batch, least recently
     stepped first; states stay in the runner's pool.

A session's committed state is (pool state, tokens still waiting, logits of
the last consumed token). A sampled character joins the waiting tokens only
when its caller acknowledges delivery, so a cancelled or undelivered
character never reaches the state. Everything below the "engine thread"
marker runs on the engine thread only and needs no locks.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np

from server.generation import (
    LENGTH,
    SHUTDOWN,
    STOP,
    GenerationEvent,
    GenerationHandle,
    GenerationRequest,
    Job,
)
from server.model_runner import ModelRunner
from server.sampling import choose_token, new_generator
from server.structured_log import log_event
from server.vocabulary import Vocabulary

logger = logging.getLogger("charstream.server")


class StepObserver(Protocol):
    def observe_step(self, batch_size: int, seconds: float) -> None: ...


@dataclass(eq=False)
class SlotState:
    """One session's model state (engine thread only)."""

    rng: np.random.Generator
    pending: collections.deque = field(default_factory=collections.deque)  # token ids not yet consumed
    logits: np.ndarray | None = None  # [V] after the last consumed token; None while tokens wait
    fresh: bool = True  # nothing consumed yet: the pool row is stale, start from zeros
    spare_uniform: float | None = None  # drawn for an undelivered character; used next
    job: Job | None = None
    last_step: int = -1  # iteration of this slot's last step (batch fairness)
    lost: bool = False  # a failed step lost tokens of this state: unusable until reset


class Engine:
    def __init__(self, runner: ModelRunner, max_batch: int = 256, observer: StepObserver | None = None):
        if max_batch <= 0:
            raise ValueError(f"max_batch must be positive, got {max_batch}")
        self.runner = runner
        self.vocab = Vocabulary(runner.info.spec.vocab)
        self.max_batch = max_batch
        self._observer = observer
        self._commands: collections.deque[Callable[[], None]] = collections.deque()
        self._wake = threading.Event()
        self._slots: dict[int, SlotState] = {}
        # Slots with tokens waiting or a generation attached, in arrival order
        # (a dict as an ordered set): iterations touch these, not every slot.
        self._active: dict[int, None] = {}
        self._events: list[tuple[GenerationHandle, GenerationEvent]] = []
        self._iteration = 0
        self._draining = False
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="charstream-engine", daemon=True)

    # ---- caller side (any thread; each call queues a command and returns at once) ----

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread after the step in progress."""
        self._submit(self._set_stopping)
        self._thread.join(timeout)

    def open_slot(self, slot: int, seed: int, prompt_tokens: list[int]) -> None:
        """A new session in `slot`: zero state, stream seeded with `seed`, prompt queued."""
        self._submit(lambda: self._open(slot, seed, prompt_tokens))

    def reset_slot(self, slot: int, seed: int | None, prompt_tokens: list[int]) -> None:
        """Back to a zero state (re-seeded when `seed` is given), prompt queued."""
        self._submit(lambda: self._reset(slot, seed, prompt_tokens))

    def close_slot(self, slot: int) -> None:
        self._submit(lambda: self._slots.pop(slot, None))

    def generate(self, slot: int, request: GenerationRequest, loop: asyncio.AbstractEventLoop) -> GenerationHandle:
        """Start a generation on `slot`; read its characters from the handle."""
        handle = GenerationHandle(loop, self._submit)
        handle.job = Job(slot, request, handle, self._ack, self._cancel)
        self._submit(lambda: self._start(handle.job))  # type: ignore[arg-type]
        return handle

    def drain(self) -> None:
        """Shutting down: end every generation, now and future, with finish reason SHUTDOWN."""
        self._submit(self._set_draining)

    def _submit(self, command: Callable[[], None]) -> None:
        self._commands.append(command)  # deque.append is atomic across threads
        self._wake.set()

    # ---- engine thread ----

    def _set_stopping(self) -> None:
        self._stopping = True

    def _set_draining(self) -> None:
        self._draining = True

    def _open(self, slot: int, seed: int, prompt_tokens: list[int]) -> None:
        self._slots[slot] = SlotState(rng=new_generator(seed), pending=collections.deque(prompt_tokens))
        self._active[slot] = None

    def _reset(self, slot: int, seed: int | None, prompt_tokens: list[int]) -> None:
        state = self._slots[slot]
        if seed is not None:
            state.rng = new_generator(seed)
            state.spare_uniform = None
        state.pending = collections.deque(prompt_tokens)
        state.logits = None
        state.fresh = True
        state.lost = False
        self._active[slot] = None

    def _start(self, job: Job) -> None:
        state = self._slots.get(job.slot)
        if state is None or state.job is not None:
            self._finish(job, GenerationEvent(error="the session is closed or already generating", refused=True))
            return
        if self._draining:
            self._finish(job, GenerationEvent(finish=SHUTDOWN, refused=True))
            return
        if state.lost:
            message = "the session's state was lost in a failed model step: reset or delete the session"
            self._finish(job, GenerationEvent(error=message, error_is_precondition=True, refused=True))
            return
        if not state.pending and state.logits is None and not job.request.prompt_tokens:
            message = "the session has consumed no text yet: send a prompt"
            self._finish(job, GenerationEvent(error=message, error_is_precondition=True, refused=True))
            return
        # Only an accepted request re-seeds the session and queues its prompt.
        if job.request.seed is not None:
            state.rng = new_generator(job.request.seed)
            state.spare_uniform = None
        state.pending.extend(job.request.prompt_tokens)
        state.job = job
        self._active[job.slot] = None

    def _ack(self, job: Job) -> None:
        state = self._slots.get(job.slot)
        if not job.awaiting_ack or state is None or state.job is not job:
            return
        state.pending.append(job.in_flight_token)
        state.logits = None
        self._active[job.slot] = None
        job.awaiting_ack = False
        job.in_flight_uniform = None
        if job.done:
            state.job = None

    def _cancel(self, job: Job) -> None:
        state = self._slots.get(job.slot)
        if state is None or state.job is not job:
            return
        if job.awaiting_ack and job.in_flight_uniform is not None:
            # The character was never delivered: give its random number back.
            state.spare_uniform = job.in_flight_uniform
        job.awaiting_ack = False
        job.done = True
        state.job = None

    def _finish(self, job: Job, event: GenerationEvent) -> None:
        job.done = True
        self._events.append((job.handle, event))

    def _active_states(self) -> list[tuple[int, SlotState]]:
        """Active slots still open; closed ones and idle ones leave the active set."""
        found = []
        for slot in list(self._active):
            state = self._slots.get(slot)
            if state is None or (not state.pending and state.job is None):
                del self._active[slot]
            else:
                found.append((slot, state))
        return found

    def _sample_ready(self) -> None:
        for _, state in self._active_states():
            job = state.job
            if job is None or job.awaiting_ack or job.done:
                continue
            if self._draining:
                # Ends at once, even mid-prompt: the prompt is still consumed in the background.
                self._finish(job, GenerationEvent(finish=SHUTDOWN))
                state.job = None
                continue
            if state.pending or state.logits is None:
                continue
            settings = job.request.settings
            uniform = None
            if not settings.greedy:
                uniform = state.spare_uniform if state.spare_uniform is not None else state.rng.random()
                state.spare_uniform = None
            token = choose_token(state.logits, settings, uniform or 0.0)
            char = self.vocab.chars[token]
            job.produced += 1
            job.awaiting_ack, job.in_flight_token, job.in_flight_uniform = True, token, uniform
            matched = job.matcher.push(char)
            if matched is not None:
                self._finish(job, GenerationEvent(text=char, finish=STOP, matched_stop=matched))
            elif job.produced >= job.request.max_chars:
                self._finish(job, GenerationEvent(text=char, finish=LENGTH))
            else:
                self._events.append((job.handle, GenerationEvent(text=char)))

    def _step(self) -> None:
        ready = [(slot, state) for slot, state in self._active_states() if state.pending]
        if not ready:
            return
        if len(ready) > self.max_batch:
            ready.sort(key=lambda item: item[1].last_step)
            ready = ready[: self.max_batch]
        tokens = np.fromiter((state.pending[0] for _, state in ready), dtype=np.int64, count=len(ready))  # [B]
        slots = np.fromiter((slot for slot, _ in ready), dtype=np.int64, count=len(ready))  # [B]
        fresh = np.fromiter((state.fresh for _, state in ready), dtype=bool, count=len(ready))  # [B]
        started = time.perf_counter()
        try:
            logits = self.runner.step(tokens, slots, fresh)  # [B, V]
        except Exception as exc:  # noqa: BLE001 - one failed step must not kill the engine
            logger.exception("model step failed")
            for _, state in ready:
                # The state can no longer be trusted; dropping its tokens also keeps a
                # persistent failure from being retried in a tight loop.
                state.pending.clear()
                state.logits = None
                state.lost = True
                if state.job is not None and not state.job.done:
                    self._finish(state.job, GenerationEvent(error=f"model step failed: {exc}"))
                    state.job = None
            return
        if self._observer is not None:
            self._observer.observe_step(len(ready), time.perf_counter() - started)
        for row, (_, state) in enumerate(ready):
            state.pending.popleft()
            state.fresh = False
            state.last_step = self._iteration
            if not state.pending:
                state.logits = logits[row].copy()  # [V]

    def _has_work(self) -> bool:
        return any(
            state.pending or (state.job is not None and not state.job.awaiting_ack and not state.job.done)
            for _, state in self._active_states()
        )

    def _flush_events(self) -> None:
        """Hand this iteration's events to their loops: one thread hop per loop, not per event."""
        if not self._events:
            return
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[GenerationHandle, GenerationEvent]]] = {}
        for handle, event in self._events:
            by_loop.setdefault(handle.loop, []).append((handle, event))
        self._events = []
        for loop, events in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver_all, events)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                pass

    def _run(self) -> None:
        while not self._stopping:
            if not self._commands and not self._has_work():
                self._wake.wait()
            self._wake.clear()
            while self._commands:
                command = self._commands.popleft()
                try:
                    command()
                except Exception:  # noqa: BLE001 - a bad command must not kill the engine
                    logger.exception("engine command failed")
            self._sample_ready()
            self._flush_events()  # before the step: characters reach clients while it runs
            self._step()
            self._flush_events()  # errors of a failed step
            self._iteration += 1
        log_event(logger, "engine_stopped", iterations=self._iteration)


def _deliver_all(events: list[tuple[GenerationHandle, GenerationEvent]]) -> None:
    for handle, event in events:
        handle.deliver(event)
