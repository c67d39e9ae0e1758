"""The scheduler's commands: sessions opened, reset, restored, snapshotted and closed; requests
submitted, acknowledged, aborted and settled (scheduler.py runs the iterations).

A mixin of Scheduler's, on the engine thread only: it works on the scheduler's own state (the
attributes LaneGlue declares, set in Scheduler.__init__). A request the steady lane holds is
brought back to its objects first (lane_glue.py) by every command that reads them.
"""

from __future__ import annotations

import collections

import numpy as np

from server.engine.generation import (
    CANCELLED,
    FINISHED_BY_REASON,
    GenerationRequest,
    RequestStatus,
    StopMatcher,
    StreamEvent,
    recent_tail,
)
from server.engine.sampling import stream_key
from server.engine.scheduling.lane_glue import LaneGlue
from server.engine.scheduling.slot_state import (
    Request,
    SlotSnapshot,
    SlotState,
    acknowledge,
    owned,
    refusal_of,
    restored,
    rewind,
    snapshot_of,
)


class SessionCommands(LaneGlue):
    chars: list[str]  # the rest of the state it works on is declared by LaneGlue

    def _decode(self, tokens: list[int] | tuple[int, ...]) -> str:
        return "".join(self.chars[t] for t in tokens)

    def open(self, slot: int, seed: int, prompt_tokens: list[int]) -> None:
        self.slots[slot] = SlotState(key=stream_key(seed))
        self.reset(slot, None, prompt_tokens)

    def reset(self, slot: int, seed: int | None, prompt_tokens: list[int]) -> None:
        self._leave_slot(slot)
        state = self.slots[slot]
        if seed is not None:
            state.key, state.position = stream_key(seed), 0
        state.pending = collections.deque(prompt_tokens)
        state.logits, state.start, state.lost = None, self._zero_state, False
        state.consumed, state.recent = len(prompt_tokens), recent_tail("", self._decode(prompt_tokens))
        self.prefixes.start(state, prompt_tokens, self._decode(prompt_tokens))
        self._active[slot] = None

    def snapshot(self, slot: int) -> SlotSnapshot:
        """The session's state after its prompts and delivered characters (slot_state.snapshot_of)."""
        self._leave_slot(slot)
        state = self.slots.get(slot)
        if state is None:
            raise LookupError("the session is closed")
        if state.lost:
            raise ValueError("the session's state was lost in a failed model step: reset or delete the session")
        return snapshot_of(state, lambda: self.runner.read_states(np.array([slot]))[:, 0, :], self._decode)

    def restore(self, slot: int, snapshot: SlotSnapshot) -> None:
        """Open `slot` continuing exactly from `snapshot` (a fork, an import, a session loaded from a store)."""
        self.close(slot)
        state = self.slots[slot] = restored(snapshot)
        self.prefixes.start_restored(state, snapshot, self._decode(snapshot.pending))
        self._active[slot] = None

    def close(self, slot: int) -> None:
        self._leave_slot(slot)
        state = self.slots.pop(slot, None)
        if state is not None and state.request is not None:
            self.requests.pop(state.request.id, None)
            self._outside.pop(state.request.id, None)

    def submit(self, request_id: int, slot: int, spec: GenerationRequest) -> None:
        state = self.slots.get(slot)
        refusal = refusal_of(state, spec, self.draining)
        if refusal is not None:
            self.events.append((request_id, refusal))
            return
        assert state is not None
        # Only an accepted request re-seeds the session and queues its prompt.
        if spec.seed is not None:
            state.key, state.position = stream_key(spec.seed), 0
        if spec.prompt_tokens:
            state.capture = None  # the state after the queue is no longer that of the prompt alone
            state.logits = None  # the next character comes after the prompt: those logits are spent
        state.pending.extend(spec.prompt_tokens)
        self._active[slot] = None
        state.consumed += len(spec.prompt_tokens)
        state.recent = recent_tail(state.recent, self._decode(spec.prompt_tokens))
        status = RequestStatus.WAITING if state.pending else RequestStatus.GENERATING
        request = Request(request_id, slot, spec, status, StopMatcher(spec.stops), state.position,
                          plain=spec.settings.samples_plainly(len(self.chars)))
        state.request = self.requests[request_id] = self._outside[request_id] = request
        self.events.append((request_id, StreamEvent(accepted=True, consumed_chars=state.consumed,
                                                    recent_text=state.recent)))

    def ack(self, request_id: int, delivered: int) -> None:
        """The caller has handed `delivered` characters to its client in all."""
        lane = self.lane
        if lane is not None and request_id in lane.row_of_request:
            lane.ack_one(lane.row_of_request[request_id], delivered)
            return
        request = self.requests.get(request_id)
        if request is None:
            return
        acknowledge(request, delivered)
        if request.status.is_finished and request.delivered == len(request.tokens):
            self._settle(request)

    def abort(self, request_id: int, delivered: int) -> None:
        """The caller ended the request after handing `delivered` characters: undo the rest."""
        self._leave_request(request_id)
        request = self.requests.get(request_id)
        if request is None:
            return
        self.ack(request_id, delivered)
        if request.id in self.requests:
            if not request.status.is_finished:
                request.status = RequestStatus.ABORTED
                self.events.append((request.id, StreamEvent(finish=CANCELLED)))  # closes the caller's route
            self._settle(request)

    def drain(self) -> None:
        self.draining = True

    def end_requests(self, request_ids: list[int], reason: str) -> None:
        """End these running requests with `reason` (one caller's shutdown, as drain does for all);
        each is settled when its caller's final ack or abort says what it delivered."""
        for request_id in request_ids:
            self._leave_request(request_id)
            request = self.requests.get(request_id)
            if request is not None and not request.status.is_finished:
                request.status = FINISHED_BY_REASON[reason]
                self.events.append((request_id, StreamEvent(finish=reason)))

    # ---- settling a finished request ----

    def _settle(self, request: Request) -> None:
        """Detach the request; the session keeps exactly its delivered characters."""
        state = self.slots[request.slot]
        if request.delivered < len(request.tokens):
            rewind(state, request, request.delivered)
            self._active[request.slot] = None
        delivered = request.tokens[: request.delivered]
        state.consumed += len(delivered)
        state.recent = recent_tail(state.recent, self._decode(delivered))
        # An idle session keeps its own rows: the last step's outputs are views of the whole batch's.
        state.logits = owned(state.logits)
        state.start = owned(state.start)
        state.request = None
        del self.requests[request.id]
        self._outside.pop(request.id, None)
