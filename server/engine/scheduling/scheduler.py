"""The scheduler: which sessions step, sampling, and every request's bookkeeping.

It runs on the engine thread only (no locks) and knows nothing of threads or
event loops: the engine (loop.py) feeds it commands and hands the events it
collects to the callers. One iteration (the engine calls `sample()`, then `step()`):

  1. samples the next character of every generating request whose logits are
     ready and which is less than `lookahead` characters ahead of what its
     caller has handed to the client (one vectorised pass for the batch;
     a lone running request's is left to the stretch graph's call);
  2. runs ONE model step for every slot with a token waiting (prompt
     characters and the characters just sampled), up to max_batch, least
     recently stepped first; or, when the ready sessions all sample with a
     plain temperature, one call of the stretch graph that also samples and
     consumes several more characters for each (stretch.py for a lone
     session, batch_stretch.py for a batch outside the lane, lane_stretch.py
     for the steady lane's rows).
The per-row work of both (taking drawn characters, a step's inputs and
outputs) is row_updates.py's. Requests that are plainly running (no stop
strings, short of max_chars) and that no stretch outside the lane takes are
the steady lane's instead (steady_lane.py): with host-state runners every
such request of a batch, whose stretches then run over the lane's columns;
with states on a device the greedy and top-k/top-p ones (every one with
--no-stretch). Their sampling, step bookkeeping, events and
acknowledgements are array operations over all of them, so an iteration's
cost hardly grows with their number. The commands (open, submit,
ack, abort, ...) are scheduler_commands.py's; the lane's side of them
lane_glue.py's.

Generation runs ahead of delivery, so a request can end (cancel, deadline,
disconnect) with characters generated that its client never got. Those are
undone: every step that consumes a generated character keeps the state it
started from (the request's window, at most lookahead + 1 states), so the
session can return exactly to the state after its last delivered character,
and its random stream is a counter that rewinds with it (sampling.py). A
session's state is therefore always its prompts plus its delivered text.
"""

from __future__ import annotations

import logging

import numpy as np

from server.engine.generation import (
    BLOCK,
    FINISHED_BY_REASON,
    SHUTDOWN,
    RequestStatus,
    StreamEvent,
)
from server.engine.observer import StepObserver
from server.engine.prefix_cache import PrefixCache
from server.engine.runner.model_runner import ModelRunner
from server.engine.sampling import sample_batch
from server.engine.scheduling.batch_stretch import (
    BATCH_STRETCH_MIN,
    DEFAULT_BATCH_STRETCH,
    step_together,
)
from server.engine.scheduling.prefill import PREFILL_MAX_BATCH, prefill
from server.engine.scheduling.prefix_states import PrefixStates
from server.engine.scheduling.row_updates import run_step, take_drawn, take_step
from server.engine.scheduling.scheduler_commands import SessionCommands
from server.engine.scheduling.slot_state import Request, SlotState, lose
from server.engine.scheduling.steady_lane import TOKENS, SteadyLane, may_enter
from server.engine.scheduling.stretch import step_alone, stretch_length

logger = logging.getLogger("charstream.server")


class Scheduler(SessionCommands):
    def __init__(self, runner: ModelRunner, max_batch: int, lookahead: int, observer: StepObserver | None = None,
                 prefix_cache: PrefixCache | None = None, stretch: bool = True,
                 batch_stretch: int = DEFAULT_BATCH_STRETCH, lane: bool = True,
                 lane_stretch: bool = True):
        if max_batch <= 0 or lookahead <= 0:
            raise ValueError(f"max_batch and lookahead must be positive, got {max_batch} and {lookahead}")
        self.runner = runner
        self.chars = runner.info.spec.vocab
        self.max_batch = max_batch
        self.lookahead = lookahead
        # A lone session consumes its queue, and samples ahead, in one model call (stretch.py).
        self.stretch = stretch and runner.stretch_session is not None
        self.batch_stretch = batch_stretch  # most characters a batch's call samples per row; < 2: none
        self._observer = observer
        self.prefixes = PrefixStates(prefix_cache, runner, observer)
        spec = runner.info.spec
        self._zero_state = np.zeros((spec.num_layers, spec.hidden_size), np.float32)  # [L, H]
        self.slots: dict[int, SlotState] = {}
        self.requests: dict[int, Request] = {}
        # Plainly running requests keep their per-step bookkeeping in arrays (steady_lane.py); the
        # rest are `_outside`, the only requests an iteration looks at one by one.
        # Plain-temperature requests of a batch stretch in the lane itself where the runner can make
        # the call over pooled rows (lane_stretch.py: host states, or a device pool with its stretch
        # graph); elsewhere batch_stretch.py's per-row path takes them.
        self.lane_stretches = (lane and lane_stretch and self.stretch and batch_stretch >= BATCH_STRETCH_MIN
                               and max_batch >= 2 and runner.stretches_rows())
        # A lane call keeps at most half the lookahead a row, and the lane's store of characters holds
        # TOKENS calls: what sizes its undo ring (SteadyLane.advance) is the most a call can sample.
        most = min(batch_stretch, lookahead // 2 - 1, TOKENS) if self.lane_stretches else 0
        self.lane = SteadyLane(runner.info.num_slots, len(self.chars), lookahead, most) if lane else None
        self._outside: dict[int, Request] = {}
        # Slots that may have tokens waiting (a dict as an ordered set): steps look here, not at every slot.
        self._active: dict[int, None] = {}
        self.events: list[tuple[int, StreamEvent]] = []  # (request id, event), collected for the engine
        self._text_events = [StreamEvent(text=char) for char in self.chars]  # token id -> its plain text event
        self.draining = False
        self._iteration = 0
        self._graph_draws: int | None = None  # the slot whose next character the stretch graph draws

    # ---- one iteration ----

    def _ready_slots(self) -> list[tuple[int, SlotState]]:
        """Open slots with tokens waiting; the others leave the active set."""
        ready = []
        for slot in list(self._active):
            state = self.slots.get(slot)
            if state is None or not state.pending:
                del self._active[slot]
            else:
                ready.append((slot, state))
        return ready

    def has_work(self) -> bool:
        slots = self.slots
        for slot in self._active:  # the first slot with a token waiting settles it (no list built)
            state = slots.get(slot)
            if state is not None and state.pending:
                return True
        if self.lane is not None and len(self.lane) and self.lane.has_work():
            return True
        return any(
            self._can_sample(r) or (self.draining and not r.status.is_finished) for r in self._outside.values()
        )

    def _end_all(self, reason: str) -> None:
        for request in self.requests.values():
            if not request.status.is_finished:
                request.status = FINISHED_BY_REASON[reason]
                # Settled when the caller's final ack (or abort) says what it delivered.
                self.events.append((request.id, StreamEvent(finish=reason)))

    def _can_sample(self, request: Request) -> bool:
        state = self.slots[request.slot]
        return (
            request.status is RequestStatus.GENERATING
            and state.logits is not None
            and not state.pending
            and len(request.tokens) - request.delivered < self.lookahead
        )

    def sample(self) -> None:
        """Sample the next character of every request that may run ahead; one vectorised pass."""
        self._graph_draws = None  # only ever this iteration's
        lane = self.lane
        if self.draining:
            self.leave_lane()
            self._end_all(SHUTDOWN)
        elif lane is not None and len(lane):
            finishing = lane.finishing()
            if finishing.size:  # their last character's event finishes them: the per-row path's
                self._leave_lane(finishing)
            if self.lane_stretches and len(lane) == 1 and len(self.requests) == 1 and lane.plain[0]:
                self._leave_lane([0])  # a lone stream's calls are stretch.py's: longer, and the graph draws
        # _can_sample for every request outside the lane, inlined: this runs once per iteration.
        rows, states, slots, lookahead, generating = [], [], self.slots, self.lookahead, RequestStatus.GENERATING
        entering = []
        may_join = lane is not None and not self.draining and len(self.requests) <= self.max_batch
        # Whether a stretch outside the lane takes plain requests: all of them, or a lone one.
        stretches_outside = self.stretch and not (self.lane_stretches and len(self.requests) > 1)
        for request in self._outside.values():
            if request.status is generating and len(request.tokens) - request.delivered < lookahead:
                state = slots[request.slot]
                if state.logits is not None and not state.pending:
                    if may_join and may_enter(request, state, lookahead, stretches_outside, self.lane_stretches):
                        entering.append((request, state))
                        continue
                    rows.append(request)
                    states.append(state)
        self._enter_lane(entering)
        block = lane.sample() if lane is not None and len(lane) else None
        if block is not None:
            self.events.append((BLOCK, block))
        if not rows:
            if block is not None:
                self._observe_lookahead()
            return
        if len(rows) == 1 and block is None and self._graph_may_draw(rows[0]):
            self._graph_draws = rows[0].slot  # step() makes the call that draws it (and more)
            return
        tokens, draws = sample_batch([s.logits for s in states], [r.spec.settings for r in rows],
                                     [(s.key, s.position) for s in states], all(r.plain for r in rows))
        take_drawn(rows, states, tokens, draws, self.chars, self._text_events, self.events, self._active)
        if may_join and self.lane_stretches:
            # Requests that just drew a character (a new one's first) join now, with it queued: this
            # step is then the lane's stretch, not an ordinary step for their sake.
            self._enter_lane([(request, state) for request, state in zip(rows, states)
                              if may_enter(request, state, lookahead, stretches_outside, True, sampled=True)])
        self._observe_lookahead()

    def _enter_lane(self, entering: list[tuple[Request, SlotState]]) -> None:
        # Their last calls' states (batch_stretch.py's) into the pool in one write: on a device
        # each write is a graph call that copies the pool.
        starting = [(request.slot, state) for request, state in entering if state.start is not None]
        if starting:
            self.runner.put_states(np.array([slot for slot, _ in starting], np.int64),
                                   np.stack([state.start for _, state in starting], axis=1))  # [L, B, H]
            for _, state in starting:
                state.start = None
        for request, state in entering:
            self.lane.enter(request, state)  # type: ignore[union-attr]
            del self._outside[request.id]

    def _graph_may_draw(self, request: Request) -> bool:
        """Whether the lone sampling request's next character is left to the stretch graph, which
        draws it from the same logits with the same random number and then runs on (stretch.py):
        one NumPy draw, one event and one message fewer per call. Not its first character (NumPy
        sends that at once: time to first character), nor one the graph's draw disputed, nor when
        the call could not sample two (a step costs less), nor while another slot has tokens
        waiting (the step would not be a lone session's)."""
        if not (self.stretch and request.plain and request.tokens and not request.numpy_draws
                and stretch_length(request, self.lookahead) >= 2):
            return False
        slots = self.slots
        return not any((state := slots.get(slot)) is not None and state.pending for slot in self._active)

    def _observe_lookahead(self) -> None:
        if self._observer is not None:
            ahead = [len(r.tokens) - r.delivered for r in self._outside.values()]
            total, most = sum(ahead), max(ahead, default=0)
            if self.lane is not None and len(self.lane):
                in_lane = self.lane.ahead()
                total, most = total + int(in_lane.sum()), max(most, int(in_lane.max()))
            self._observer.observe_lookahead(total, most)

    def step(self) -> None:
        """One batched model step over the slots with tokens waiting."""
        self._iteration += 1
        lane = self.lane
        if lane is not None and len(lane):
            expiring = lane.expiring()
            if expiring.size:
                lane.spill(expiring)
        ready = self._ready_slots()
        if lane is not None and len(lane):
            lane_rows = lane.ready()
            if lane_rows.size and len(ready) + lane_rows.size > self.max_batch:
                self.leave_lane()  # more than one batch: the per-row path's fairness decides
                ready = self._ready_slots()
            elif lane_rows.size:
                if self.lane_stretches and self._graph_draws is None and self._stretched_apart(ready, lane_rows):
                    return
                self._step_with_lane(ready, lane_rows)
                return
        drawing, self._graph_draws = self._graph_draws, None
        if not ready:
            state = self.slots.get(drawing) if drawing is not None else None
            if state is not None and state.request is not None:
                if self._stretched([(drawing, state)]):  # type: ignore[list-item]
                    self._observe_lookahead()
                else:  # never: sample() checked the call's length; NumPy draws rather than none
                    state.request.numpy_draws = True
            return
        if len(ready) <= PREFILL_MAX_BATCH and self.runner.prefill_session is not None:
            ready = prefill(self.runner, ready, lambda state, exc: self._fail([state], exc))
            if not ready:  # its only slots failed in prefill: no step of zero rows
                return
        if self.stretch and self._stretched(ready):
            self._observe_lookahead()  # a stretch ran ahead: the gauges must say how far
            return
        if len(ready) > self.max_batch:
            ready.sort(key=lambda item: (item[1].last_step, item[0]))  # ties: lowest slot (any order of _active)
            ready = ready[: self.max_batch]
        try:
            output = run_step(self.runner, ready, self._zero_state, self._observer)
        except Exception as exc:  # noqa: BLE001 - one failed step must not kill the engine
            logger.exception("model step failed")
            self._fail([state for _, state in ready], exc)
            return
        take_step(ready, output, self.lookahead, self._iteration)
        self.prefixes.capture(ready)

    def _stretched(self, ready: list[tuple[int, SlotState]]) -> bool:
        """The ready sessions' call through the stretch graph: a lone session's (stretch.step_alone)
        or a batch's (batch_stretch.step_together: the max_batch least recently stepped, as an
        ordinary step takes). False leaves them to the ordinary step."""
        try:
            if len(ready) == 1:
                slot, state = ready[0]
                request = state.request
                stepped, event = step_alone(self.runner, slot, state, self.lookahead, self.chars, self._observer)
                events = [(request.id, event)] if event is not None and request is not None else []
            elif self.max_batch >= 2:
                if len(ready) > self.max_batch:
                    ready = sorted(ready, key=lambda item: (item[1].last_step, item[0]))[: self.max_batch]
                found = step_together(self.runner, ready, self.lookahead, self.chars, self._observer,
                                      self.batch_stretch)
                stepped, events = found is not None, found or []
            else:
                return False
        except Exception as exc:  # noqa: BLE001 - as a failed step: these sessions only
            logger.exception("model step failed")
            self._fail([state for _, state in ready], exc)
            return True
        if not stepped:
            return False
        for _, state in ready:
            state.last_step = self._iteration
        self.events.extend(events)
        self.prefixes.capture(ready)
        return True

    def fail_running(self, exc: Exception) -> None:
        """An iteration failed outside the model step: end every running generation (their states
        can no longer be trusted), so the engine can go on serving the others."""
        self.leave_lane()
        self._fail([self.slots[r.slot] for r in list(self.requests.values()) if r.slot in self.slots], exc)

    def _fail(self, states: list[SlotState], exc: Exception) -> None:
        for request in [lose(state) for state in states]:
            if request is None:
                continue
            del self.requests[request.id]
            self._outside.pop(request.id, None)
            if not request.status.is_finished:
                request.status = RequestStatus.FINISHED_ERROR
                self.events.append((request.id, StreamEvent(error=f"model step failed: {exc}")))
