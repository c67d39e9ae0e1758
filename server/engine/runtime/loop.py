"""The engine loop: one thread, one command queue, and the fan-out of events to callers.

Callers on any thread queue commands (open/reset/close a slot, submit,
ack, abort, drain); the engine thread applies them between steps, runs one
scheduler iteration (scheduler.py: sampling, one batched model step,
bookkeeping), and posts the iteration's events to each caller's loop hub
(stream.py: at most one wake-up outstanding per loop, none when nothing
happened). Requests are addressed by id: the engine holds no caller objects
but the per-loop hubs that route events.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import threading
from typing import Callable

from server.engine.generation import GenerationRequest, StreamEvent
from server.engine.model.vocabulary import Vocabulary
from server.engine.observer import StepObserver
from server.engine.prefix_cache import PrefixCache
from server.engine.runner.model_runner import ModelRunner
from server.engine.runtime.stream import GenerationStream, StreamHub, StreamHubs
from server.engine.scheduling.batch_stretch import DEFAULT_BATCH_STRETCH
from server.engine.scheduling.scheduler import Scheduler
from server.engine.scheduling.slot_state import SlotSnapshot
from server.structured_log import log_event

logger = logging.getLogger("charstream.server")

# A lone stream's calls take up to half the lookahead (stretch.py): at 128, 64 characters per call,
# and per-call costs (the engine's Python, a message) paid half as often as at 64, for a stalled
# reader's window of at most 129 states (516 KiB at the default size) instead of 65.
DEFAULT_LOOKAHEAD = 128


class Engine:
    def __init__(self, runner: ModelRunner, max_batch: int = 256, observer: StepObserver | None = None,
                 lookahead: int = DEFAULT_LOOKAHEAD, prefix_cache: PrefixCache | None = None, stretch: bool = True,
                 batch_stretch: int = DEFAULT_BATCH_STRETCH, lane_stretch: bool = True):
        self.runner = runner
        self.vocab = Vocabulary(runner.info.spec.vocab)
        # Engine thread only:
        self.scheduler = Scheduler(runner, max_batch, lookahead, observer, prefix_cache, stretch, batch_stretch,
                                   lane_stretch=lane_stretch)
        self._commands: collections.deque[Callable[[], None]] = collections.deque()
        self._wake = threading.Event()
        self._ids = itertools.count(1)
        self._hubs = StreamHubs()
        self._routes: dict[int, StreamHub] = {}  # engine thread: request id -> its caller's hub
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="charstream-engine", daemon=True)

    @property
    def lookahead(self) -> int:
        return self.scheduler.lookahead

    # ---- caller side (any thread; each call queues a command and returns at once) ----

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread after the step in progress."""
        self._submit(self._set_stopping)
        self._thread.join(timeout)

    def open_slot(self, slot: int, seed: int, prompt_tokens: list[int]) -> None:
        """A new session in `slot`: zero state, stream seeded with `seed`, prompt queued."""
        self._submit(lambda: self.scheduler.open(slot, seed, prompt_tokens))

    def reset_slot(self, slot: int, seed: int | None, prompt_tokens: list[int]) -> None:
        """Back to a zero state (re-seeded when `seed` is given), prompt queued."""
        self._submit(lambda: self.scheduler.reset(slot, seed, prompt_tokens))

    def close_slot(self, slot: int) -> None:
        self._submit(lambda: self.scheduler.close(slot))

    def restore_slot(self, slot: int, snapshot: SlotSnapshot) -> None:
        """A session in `slot` continuing exactly from `snapshot`."""
        self._submit(lambda: self.scheduler.restore(slot, snapshot))

    async def snapshot(self, slot: int) -> SlotSnapshot:
        """The state of the session in `slot` after its prompts and the characters delivered so
        far (commands run in order: it sees every ack queued before it). Raises LookupError
        for a closed slot and ValueError for a state lost in a failed step."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[SlotSnapshot] = loop.create_future()

        def settle(result: SlotSnapshot | None, error: Exception | None) -> None:
            if future.done():  # the caller gave up waiting
                return
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)  # type: ignore[arg-type]

        def command() -> None:
            try:
                result, error = self.scheduler.snapshot(slot), None
            except Exception as exc:  # noqa: BLE001 - every failure goes to the waiting caller
                result, error = None, exc
            try:
                loop.call_soon_threadsafe(settle, result, error)
            except RuntimeError:  # the caller's loop is closed
                pass

        if not self._thread.is_alive():
            raise RuntimeError("the engine is not running")
        self._submit(command)
        return await future

    def submit(self, slot: int, request: GenerationRequest) -> GenerationStream:
        """Start a generation on `slot`, from a coroutine; read its chunks from the returned stream."""
        hub, stream = self._hubs.open_stream(next(self._ids), self.ack, self.abort)

        def command() -> None:
            self._routes[stream.request_id] = hub
            try:
                self.scheduler.submit(stream.request_id, slot, request)
            except Exception as exc:  # noqa: BLE001 - its caller waits for an answer: give it one
                logger.exception("engine command failed")
                self.scheduler.events.append((stream.request_id, command_failed(exc)))

        self._submit(command)
        return stream

    def ack(self, request_id: int, delivered: int) -> None:
        """`delivered` characters of the request have been handed to its client."""
        self._submit(lambda: self.scheduler.ack(request_id, delivered))

    def abort(self, request_id: int, delivered: int) -> None:
        """End the request; its session keeps exactly `delivered` generated characters."""
        self._submit(lambda: self.scheduler.abort(request_id, delivered))

    def drain(self) -> None:
        """Shutting down: end every generation, now and future, with finish reason SHUTDOWN."""
        self._submit(self.scheduler.drain)

    def _submit(self, command: Callable[[], None]) -> None:
        self._commands.append(command)  # deque.append is atomic across threads
        self._wake.set()

    # ---- engine thread ----

    def _set_stopping(self) -> None:
        self._stopping = True

    def _run(self) -> None:
        iterations = 0
        while not self._stopping:
            if not self._commands and not self.scheduler.has_work():
                self._wake.wait()
            self._wake.clear()
            while self._commands:
                command = self._commands.popleft()
                try:
                    command()
                except Exception:  # noqa: BLE001 - a bad command must not kill the engine
                    logger.exception("engine command failed")
            run_iteration(self.scheduler, self._flush)
            iterations += 1
        log_event(logger, "engine_stopped", iterations=iterations)

    def _flush(self) -> None:
        """Hand the collected events to their loops' hubs: one post per loop, not per event."""
        events = self.scheduler.take_events()
        by_hub: dict[StreamHub, list] = {}
        for request_id, event in events:
            hub = self._routes.get(request_id)
            if hub is None:
                continue
            by_hub.setdefault(hub, []).append((request_id, event))
            if event.ends_stream:
                del self._routes[request_id]
        for hub, batch in by_hub.items():
            hub.post(batch)


def command_failed(exc: Exception) -> StreamEvent:
    """The refusal a caller gets when the engine could not take its request (a bug: INTERNAL)."""
    return StreamEvent(error=f"the engine could not take the request: {exc}", refused=True)


def run_iteration(scheduler: Scheduler, flush: Callable[[], None]) -> None:
    """One engine iteration after the commands: sample, step, and hand events out in between
    (the characters just sampled reach their callers while the step runs)."""
    flush()  # acceptances and refusals
    try:
        scheduler.sample()
        flush()
        scheduler.step()
    except Exception as exc:  # noqa: BLE001 - a bug here must not stop every session for good
        logger.exception("engine iteration failed")
        scheduler.fail_running(exc)
    flush()  # failures of the step
