"""The scheduler's side of the steady lane (steady_lane.py): requests entering it, leaving it
for their objects, its characters' events, its acknowledgements and its steps.

A mixin of Scheduler's, on the engine thread only, over the scheduler's own state (declared
below, set in Scheduler.__init__). A request is in the lane or `_outside`, never both; a
command that reads a request's objects first brings it out (_leave_slot, _leave_request).
"""

from __future__ import annotations

import logging

import numpy as np

from server.engine.generation import (
    BLOCK,
    LENGTH,
    RequestStatus,
    StreamEvent,
    expand_events,
)
from server.engine.observer import StepObserver
from server.engine.runner.model_runner import ModelRunner
from server.engine.scheduling.batch_stretch import plan_together
from server.engine.scheduling.lane_stretch import stretch_lane
from server.engine.scheduling.prefill import PREFILL_MAX_BATCH, prefill
from server.engine.scheduling.prefix_states import PrefixStates
from server.engine.scheduling.row_updates import run_step, take_step
from server.engine.scheduling.slot_state import Request, SlotState, own_window
from server.engine.scheduling.steady_lane import SteadyLane

logger = logging.getLogger("charstream.server")


class LaneGlue:
    runner: ModelRunner
    lane: SteadyLane | None
    lookahead: int
    max_batch: int
    stretch: bool
    batch_stretch: int
    draining: bool
    prefixes: PrefixStates
    slots: dict[int, SlotState]
    requests: dict[int, Request]
    _outside: dict[int, Request]
    _active: dict[int, None]
    events: list
    _text_events: list[StreamEvent]
    _zero_state: np.ndarray
    _observer: StepObserver | None
    _iteration: int
    _graph_draws: int | None

    def ack_many(self, request_ids: np.ndarray, delivered: np.ndarray) -> None:
        """Acknowledgements as the callers send them, request ids [N] and characters delivered in all
        [N]: the lane's requests in one array pass, the others one by one."""
        others = self.lane.ack(request_ids, delivered) if self.lane is not None and len(self.lane) else slice(None)
        if others is None:  # every one was the lane's
            return
        for request_id, count in zip(request_ids[others].tolist(), delivered[others].tolist()):
            self.ack(request_id, count)

    def _leave_lane(self, rows: object) -> None:
        """Lane rows back to their objects (SteadyLane.leave), outside again, queued ones active."""
        assert self.lane is not None
        for request in self.lane.leave(rows):  # type: ignore[arg-type]
            self._outside[request.id] = request
            if self.slots[request.slot].pending:
                self._active[request.slot] = None

    def _leave_slot(self, slot: int) -> None:
        if self.lane is not None and slot in self.lane.row_of_slot:
            self._leave_lane([self.lane.row_of_slot[slot]])

    def _leave_request(self, request_id: int) -> None:
        if self.lane is not None and request_id in self.lane.row_of_request:
            self._leave_lane([self.lane.row_of_request[request_id]])

    def leave_lane(self) -> None:
        """Every lane row back to its Request and SlotState (tests and diagnostics read those)."""
        if self.lane is not None and len(self.lane):
            self._leave_lane(range(len(self.lane)))

    def take_events(self) -> list[tuple[int, StreamEvent]]:
        """The events collected so far as (request id, StreamEvent) pairs (the lane's CharBlocks
        expanded), and none kept."""
        events, self.events = self.events, []
        return expand_events(events, self._text_events)

    def _stretch_lane(self, lane_rows: np.ndarray) -> bool:
        """One stretch call over the lane's ready rows when they may take one (lane_stretch.py);
        False leaves them to an ordinary step."""
        lane = self.lane
        assert lane is not None
        try:
            call = stretch_lane(self.runner, lane, lane_rows, self._iteration, self._observer)
        except Exception as exc:  # noqa: BLE001 - as a failed step: these sessions only
            logger.exception("model step failed")
            lane_states = [lane.states[row] for row in lane_rows.tolist()]
            self._leave_lane(lane_rows)
            self._fail(lane_states, exc)
            return True
        if call is None:
            return False
        if call.block is not None:
            self.events.append((BLOCK, call.block))
        if call.ended.size:  # max_chars reached in the call: the finish travels with their last characters
            ended = [lane.requests[row] for row in call.ended.tolist()]
            self._leave_lane(call.ended)
            for request, tokens in zip(ended, call.ended_tokens):
                request.status = RequestStatus.FINISHED_LENGTH
                own_window(request)
                text = "".join([self._text_events[token].text for token in tokens])
                self.events.append((request.id, StreamEvent(text=text, finish=LENGTH)))
        self._observe_lookahead()  # a stretch ran ahead: the gauges must say how far
        return True

    def _stretched_apart(self, ready: list[tuple[int, SlotState]], lane_rows: np.ndarray) -> bool:
        """The lane's ready rows in a stretch call of their own (lane_stretch.py), and the ready
        slots outside the lane (stop strings, near max_chars) in theirs when they may all stretch
        (batch_stretch.py, or stretch.py for one): a row outside must not hold the lane to one
        character a step. False when neither ran (an ordinary step over all of them follows);
        when only the outside call ran, the lane's rows take an ordinary step alone."""
        if ready and plan_together(ready, self.lookahead) is None:
            return False  # a prompt or a request that cannot stretch: one ordinary step for all
        if ready and not self._stretched(ready):
            return False
        if not self._stretch_lane(lane_rows):
            if not ready:
                return False
            self._step_with_lane([], lane_rows)
        self._observe_lookahead()
        return True

    def _step_with_lane(self, ready: list[tuple[int, SlotState]], lane_rows: np.ndarray) -> None:
        """One ordinary step over the ready slots outside the lane and the lane's rows after them.
        No stretch: the caller found that one would not run (a prompt queued, a row that samples
        with top-k/top-p or greedily, or lane stretches off: _stretched_apart)."""
        lane = self.lane
        assert lane is not None
        self._graph_draws = None
        if ready and len(ready) + lane_rows.size <= PREFILL_MAX_BATCH and self.runner.prefill_session is not None:
            ready = prefill(self.runner, ready, lambda state, exc: self._fail([state], exc))
        try:
            every = lane_rows.size == len(lane)  # (ready() is sorted: rows 0 .. n-1, slices serve)
            output = run_step(self.runner, ready, self._zero_state, self._observer,
                              lane.waiting[: len(lane)].copy() if every else lane.waiting[lane_rows],
                              lane.slot[: len(lane)] if every else lane.slot[lane_rows])
        except Exception as exc:  # noqa: BLE001 - one failed step must not kill the engine
            logger.exception("model step failed")
            lane_states = [lane.states[row] for row in lane_rows.tolist()]
            self._leave_lane(lane_rows)
            self._fail([state for _, state in ready] + lane_states, exc)
            return
        take_step(ready, output, self.lookahead, self._iteration)
        lane.take_step(lane_rows, output.logits, output.inputs, len(ready), self._iteration)
        self.prefixes.capture(ready)
