"""The per-row halves of a scheduler iteration (scheduler.py): characters drawn by NumPy taken
into their requests, and an ordinary batched step run and its outputs taken into its rows.

Both loops run once per iteration over every row that moved, so they are kept to plain
attribute work: no per-row NumPy call, no per-row allocation beyond what a row needs.
"""

from __future__ import annotations

import time
from typing import Sequence

import numpy as np

from server.engine.generation import (
    FINISHED_BY_REASON,
    LENGTH,
    STOP,
    RequestStatus,
    StreamEvent,
)
from server.engine.observer import StepObserver
from server.engine.runner.model_runner import ModelRunner, StepOutput
from server.engine.scheduling.slot_state import (
    Request,
    SlotState,
    own_window,
    prompt_progress,
)


def take_drawn(rows: Sequence[Request], states: Sequence[SlotState], tokens: Sequence[int], draws: Sequence[int],
               chars: Sequence[str], text_events: Sequence[StreamEvent], events: list[tuple[int, StreamEvent]],
               active: dict[int, None]) -> None:
    """Each request's drawn character (with `draws` random numbers spent): queued for the next
    step, appended to what it generated, and its event collected (a finishing one when a stop
    string or max_chars may end the request; else the character's shared plain event)."""
    for request, state, token, spent in zip(rows, states, tokens, draws):
        generated = request.tokens
        if not generated:
            request.start_logits = state.logits
        request.numpy_draws = False
        state.position += spent
        state.pending.append(token)
        state.logits = None
        active[request.slot] = None
        generated.append(token)
        if request.matcher.stops or len(generated) >= request.spec.max_chars:
            events.append((request.id, finishing_event(request, chars[token])))
        else:
            events.append((request.id, text_events[token]))  # one shared immutable event per character


def finishing_event(request: Request, char: str) -> StreamEvent:
    """The event of a character that may end its request (a stop string matched, or max_chars)."""
    matched = request.matcher.push(char)
    finish = STOP if matched is not None else LENGTH if len(request.tokens) >= request.spec.max_chars else None
    if finish is not None:
        request.status = FINISHED_BY_REASON[finish]
    return StreamEvent(text=char, finish=finish, matched_stop=matched or "")


def run_step(runner: ModelRunner, ready: Sequence[tuple[int, SlotState]], zero_state: np.ndarray,
             observer: StepObserver | None, lane_tokens: np.ndarray | None = None,
             lane_slots: np.ndarray | None = None) -> StepOutput:
    """One model call consuming the first queued token of every ready slot; a slot with a `start`
    state (fresh, restored, or after a stretch) starts from it instead of the pool. The steady
    lane's rows (lane_tokens [R] into lane_slots [R], from the pool) come after them. Raises what
    the model call raised, the slots untouched."""
    count = len(ready)
    tokens = np.fromiter((state.pending[0] for _, state in ready), np.int64, count)  # [B]
    slots = np.fromiter((slot for slot, _ in ready), np.int64, count)  # [B]
    start_mask = np.fromiter((state.start is not None for _, state in ready), bool, count)  # [B]
    if lane_tokens is not None and lane_slots is not None:
        if count:
            tokens, slots = np.concatenate([tokens, lane_tokens]), np.concatenate([slots, lane_slots])  # [B + R]
            start_mask = np.concatenate([start_mask, np.zeros(len(lane_slots), bool)])  # [B + R]
        else:  # the lane's rows alone (the steady state): nothing to join
            tokens, slots, start_mask = lane_tokens, lane_slots, np.zeros(len(lane_slots), bool)  # [R]
        count = len(tokens)
    start_states = None
    if start_mask.any():
        start_states = np.zeros((zero_state.shape[0], count, zero_state.shape[1]), np.float32)  # [L, B, H]
        for row in np.flatnonzero(start_mask):
            start_states[:, row, :] = ready[row][1].start  # [L, H]
    started = time.perf_counter()
    output = runner.step(tokens, slots, start_mask, start_states)
    if observer is not None:
        observer.observe_step(count, time.perf_counter() - started)
    return output


def take_step(ready: Sequence[tuple[int, SlotState]], output: StepOutput, lookahead: int, iteration: int) -> None:
    """The step consumed each row's queued token: generated ones keep the state they started from
    (the undo window), prompts move their request on, and a row with nothing left queued holds
    the logits its next character is drawn from."""
    logits, inputs = output.logits, output.inputs  # [B, V], [L, B, H]
    generating = RequestStatus.GENERATING
    for row, (_, state) in enumerate(ready):
        request = state.request
        state.pending.popleft()
        state.start = None
        state.last_step = iteration
        if request is not None:
            if request.stepped < len(request.tokens):
                # This step consumed generated char k: keep the state it started from, as a
                # view of the step's input (no copy) until the request stalls at its lookahead
                # or finishes with characters its caller has yet to take (own_window).
                request.stepped += 1
                request.window[request.stepped] = inputs[:, row, :]  # [L, H]
                if request.stepped - request.delivered >= lookahead or request.status is not generating:
                    own_window(request)
            if request.status is not generating:
                prompt_progress(request, state)
        if not state.pending:
            state.logits = logits[row]  # [V]
