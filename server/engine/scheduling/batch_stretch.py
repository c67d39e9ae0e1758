"""A batch's stretches: every ready session samples and consumes several characters in one model call.

Where states are host arrays, a batch's plain-temperature requests are the
steady lane's and their calls are lane_stretch.py's, over its columns; this
per-row path takes the batches outside the lane (states on a device, rows
with stop strings or near max_chars).

Many streams step together in ordinary steps, and each step costs the engine
Python per row besides the model call: sampling, bookkeeping, events, the
state pool (0.27 ms of a 1.58 ms int8 iteration at 64 streams on a 2-core
CPU, where the model step itself is 1.3 ms). When every ready session is
generating with a plain temperature, one call of the stretch graph
(stretch_graph.py) at batch B does what K + 1 steps would: it consumes each
session's sampled character, then samples and consumes K more for every row,
and the engine's Python runs once per call. The text is the one single steps
give, as for a lone stream's stretch (stretch.py): a row's draws are checked
against the server's NumPy sampler in one pass over all K x B of them, and a
row keeps its characters up to its first disagreement; the states are those
of batched steps, bit for bit (a row does not depend on the rows beside it).

K is the most characters any row may keep: its lookahead room, half the
lookahead (so the next call has room once the client took this call's
characters), its max_chars, and at most `most` (--batch-stretch, default 16). A row that may keep
fewer keeps fewer: the rest of its row is computed and dropped, and its random
stream moves on only by what it kept. A row's limit has no ramp (a call lasts
K steps whatever each row keeps), but K grows 2, 4, 8, ... with the batch's
youngest request: while requests keep arriving, each waits a few steps.

The cost is latency for whatever arrives during a call: a new request's
prompt, a cancel, an acknowledgement wait until it ends (at most
`most` steps, about 21 ms for int8 at 64 streams on that CPU by default). A
batch with a prompt queued, a greedy or top-k/top-p request, or a request
that has not sampled yet takes ordinary steps. With more sessions ready than
max_batch, the scheduler hands this the max_batch least recently stepped.
"""

from __future__ import annotations

import time
from typing import Sequence

import numpy as np

from server.engine.generation import BLOCK, CharBlock, RequestStatus, StreamEvent
from server.engine.graphs.stretch_graph import (
    INPUT_FORCED,
    INPUT_STRETCH_LOGITS,
    INPUT_STRETCH_START,
    INPUT_TEMPERATURE,
    INPUT_UNIFORMS,
)
from server.engine.observer import StepObserver
from server.engine.runner.model_runner import ModelRunner
from server.engine.sampling import uniforms_at
from server.engine.scheduling.slot_state import Request, SlotState
from server.engine.scheduling.stretch import (
    LoopOutput,
    agreed_lengths,
    keep_stretch,
    keep_tokens,
    take_forced,
)

DEFAULT_BATCH_STRETCH = 16  # characters a batch's call samples per row at most (--batch-stretch)
BATCH_STRETCH_MIN = 2  # fewer than this: an ordinary step costs less


def keepable(request: Request, lookahead: int) -> int:
    """How many sampled characters a batch's call may keep for `request`, whose sampled character
    is queued: within its lookahead room, half the lookahead with that character, and max_chars."""
    generated = len(request.tokens)
    room = lookahead - (generated - request.delivered)
    return max(0, min(room, lookahead // 2 - 1, request.spec.max_chars - generated))


def plan_together(ready: Sequence[tuple[int, SlotState]], lookahead: int) -> list[int] | None:
    """Each row's keepable count when every ready session may stretch (a request generating with a
    plain temperature, only its sampled character queued); None when the batch takes an ordinary step."""
    limits = []
    generating = RequestStatus.GENERATING
    for _, state in ready:
        request = state.request
        if (request is None or not request.plain or request.status is not generating or len(state.pending) != 1
                or request.stepped != len(request.tokens) - 1):
            return None
        limits.append(keepable(request, lookahead))
    return limits


def step_together(runner: ModelRunner, ready: Sequence[tuple[int, SlotState]], lookahead: int,
                  chars: Sequence[str], observer: StepObserver | None,
                  most: int = DEFAULT_BATCH_STRETCH) -> list[tuple[int, StreamEvent]] | None:
    """One call for the whole batch sampling up to `most` characters per row, or None (nothing run)
    when it must take an ordinary step.
    Returns the events of the characters kept: the rows that run on as one CharBlock (several
    characters a request), a row that finished or has stop strings as (request id, event). Raises
    what the model call raised, every session untouched."""
    if runner.stretch_session is None:
        return None
    limits = plan_together(ready, lookahead)
    if limits is None:
        return None
    states = [state for _, state in ready]
    requests: list[Request] = [state.request for state in states]  # type: ignore[misc]  # plan_together checked
    # Calls grow with the batch's youngest request (2, 4, 8, 16): while requests keep arriving, what
    # arrives during a call waits a few steps, not `most`.
    youngest = min(len(request.tokens) for request in requests)
    count = min(max(limits), most, max(BATCH_STRETCH_MIN, youngest))
    if count < BATCH_STRETCH_MIN:
        return None
    batch = len(states)
    keys = np.array([state.key for state in states], np.uint64)  # [B]
    positions = np.array([state.position for state in states], np.uint64)  # [B]
    uniforms = uniforms_at(np.tile(keys, count), (positions[None, :] + np.arange(count, dtype=np.uint64)[:, None])
                           .ravel()).reshape(count, batch)  # [K, B]: row b's next K random numbers
    temperature = np.array([request.spec.settings.temperature for request in requests], np.float64)  # [B]
    started = time.perf_counter()
    forced_inputs, tokens, inputs, drawn, final_logits, final = runner.stretch_session.run(None, {
        INPUT_FORCED: np.array([[state.pending[0] for state in states]], np.int64),  # [1, B]
        INPUT_STRETCH_LOGITS: np.zeros((batch, len(chars)), np.float32),  # [B, V], unread: every row has F = 1
        INPUT_STRETCH_START: start_states(runner, ready),  # [L, B, H]
        INPUT_UNIFORMS: uniforms,  # [K, B] float64
        INPUT_TEMPERATURE: temperature,  # [B]
    })  # [1, L, B, H], [K, B], [K, L, B, H], [K, B, V], [B, V], [L, B, H]
    if observer is not None:
        observer.observe_step(batch, time.perf_counter() - started)
    agreed = agreed_lengths(tokens, drawn, uniforms, temperature)  # [B]
    drawn_by_row = tokens.T.tolist()  # [B][K]: each row's characters as ints, converted once for the batch
    events: list = []
    sampled = kept = 0
    plain_ids: list[int] = []  # the kept characters of rows that run on, as one block: (request id, token) each
    plain_tokens: list[int] = []
    for row, (state, request) in enumerate(zip(states, requests)):
        # The state after the call is copied: a view would keep the whole batch's [L, B, H] alive as long
        # as this session idles. (Undo-window views are dropped or copied when the request settles.)
        output = LoopOutput(forced_inputs[:, :, row, :], tokens[:, row], inputs[:, :, row, :], drawn[:, row, :],
                            final_logits[row].copy(), final[:, row, :].copy())
        take_forced(state, output, lookahead)
        limit, agreed_row = limits[row], int(agreed[row])
        keep = min(agreed_row, limit)
        disputed = agreed_row < min(count, limit)
        sampled += min(count, limit)
        if request.matcher.stops:  # a stop string may end the row early: the per-character path
            event = keep_stretch(request, state, output, keep, chars, lookahead, disputed=disputed)
            if event is not None:
                kept += len(event.text)
                events.append((request.id, event))
            continue
        row_tokens = drawn_by_row[row][:keep]
        finish = keep_tokens(request, state, output, row_tokens, lookahead, numpy_draws=disputed)
        kept += keep
        if finish is None:
            plain_ids += [request.id] * keep
            plain_tokens += row_tokens
        elif keep:
            events.append((request.id, StreamEvent(text="".join([chars[t] for t in row_tokens]), finish=finish)))
    if plain_ids:
        events.append((BLOCK, CharBlock(np.array(plain_ids, np.int64), np.array(plain_tokens, np.int64), several=True)))
    if observer is not None:
        observer.observe_stretch(sampled, kept)
    return events


def start_states(runner: ModelRunner, ready: Sequence[tuple[int, SlotState]]) -> np.ndarray:
    """The state each row starts from: its own override (state.start) or the pool's: [L, B, H]."""
    pooled = [row for row, (_, state) in enumerate(ready) if state.start is None]
    spec = runner.info.spec
    hidden = np.empty((spec.num_layers, len(ready), spec.hidden_size), np.float32)  # [L, B, H]
    if pooled:
        hidden[:, pooled, :] = runner.read_states(np.array([ready[row][0] for row in pooled]))  # [L, P, H]
    for row, (_, state) in enumerate(ready):
        if state.start is not None:
            hidden[:, row, :] = state.start  # [L, H]
    return hidden
