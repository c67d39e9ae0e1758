"""A batch's stretch over the steady lane's arrays: one stretch-graph call for every ready lane row,
and its bookkeeping as array operations, not a Python pass over the rows.

batch_stretch.py makes the same call for sessions outside the lane, and takes
each row's outputs into its Request and SlotState one by one: at a few
hundred rows of a model whose step costs microseconds that per-row Python
was about 40% of the engine's time. Here plain-temperature requests stay in
the lane (steady_lane.py) and a call's outputs go into its columns whole:

  - the lane has drawn each row's next character (SteadyLane.sample: the
    server's NumPy sampler); the call consumes it, then samples and
    consumes K more per row with the rows' own random numbers;
  - the draws are checked against the NumPy sampler in one pass
    (stretch.agreed_lengths) and each row keeps its characters up to its
    first disagreement and its limit (lane_plan), as batch_stretch.py's rows
    do; the lane draws the next one itself, so a disputed character is
    always NumPy's;
  - a call is K + 1 lane steps: the ring holds the state before each
    character consumed (the forced one's, then each drawn one's), so
    undoing, spilling and leaving read them as they read an ordinary step's;
  - the call starts from the rows' pooled states and leaves in the pool each
    row's state after the characters it may keep (ModelRunner.stretch_rows):
    with host states the call's own output, which HostStatePool keeps
    resident so that the next call over the same rows starts from it with no
    gather; with states on a device (device_runner.py) the graph gathers and
    scatters them there, and only the undo window's states come to the host.
    A row whose draws the check disputed kept fewer than planned: its state
    is written again, the one after its last kept character.
"""

from __future__ import annotations

import time
from typing import NamedTuple

import numpy as np

from server.engine.generation import CharBlock
from server.engine.observer import StepObserver
from server.engine.runner.model_runner import ModelRunner
from server.engine.sampling import uniforms_at
from server.engine.scheduling.batch_stretch import BATCH_STRETCH_MIN
from server.engine.scheduling.steady_lane import TOKENS, SteadyLane
from server.engine.scheduling.stretch import agreed_lengths

RAMP_BUDGET = 0.002  # seconds a call may take whatever its youngest row (lane_plan)


def lane_plan(lane: SteadyLane, rows: np.ndarray) -> tuple[int, np.ndarray] | None:
    """(K, each row's keepable count [R]) for a call over lane rows `rows` (each with its sampled
    character waiting), or None when they take an ordinary step: a row that is not plain, or a
    call that could not keep two characters.
    A row keeps at most its lookahead room, half the lookahead with the waiting character (the
    next call has room once the client took this one's), and what is left of max_chars (a row
    that reaches it ends in the call: stretch_lane). K grows with the youngest row (2, 4, 8,
    ...), as batch_stretch.py's calls do, so that what arrives during a call waits a few steps;
    but where steps are fast (a small model, a GPU) a call of up to RAMP_BUDGET seconds is
    allowed whatever the youngest: with requests arriving all the time, the ramp alone kept
    most calls at 2-4 characters a row."""
    if not lane.plain[rows].all():
        return None
    generated = lane.generated[rows]  # [R], the waiting character included
    lookahead = lane.lookahead
    limits = np.minimum(np.minimum(lookahead - (generated - lane.delivered[rows]), lookahead // 2 - 1),
                        lane.max_chars[rows] - generated).clip(0)  # [R]
    quick = int(RAMP_BUDGET / lane.stretch_step_seconds) if lane.stretch_step_seconds else 0  # steps in budget
    most = lane.advance - 1  # the most a call samples: what the lane's undo ring was sized for (Scheduler)
    count = min(int(limits.max()), most, max(BATCH_STRETCH_MIN, int(generated.min()), quick))
    return (count, limits) if count >= BATCH_STRETCH_MIN else None


class LaneCall(NamedTuple):
    """What a lane stretch kept: the characters of the rows that run on, and the rows that reached
    their max_chars in the call (lane rows [E], and each one's characters of the call, which its
    finishing event carries: they must leave the lane with it)."""

    block: CharBlock | None
    ended: np.ndarray
    ended_tokens: list[list[int]]


def stretch_lane(runner: ModelRunner, lane: SteadyLane, rows: np.ndarray, iteration: int,
                 observer: StepObserver | None) -> LaneCall | None:
    """One stretch call over lane rows `rows` (sorted, each with a character waiting), or None
    (nothing run) when they take an ordinary step. Raises what the model call raised, the lane
    untouched."""
    plan = lane_plan(lane, rows)
    if plan is None:
        return None
    count, limits = plan
    taken = slice(0, lane.n) if rows.size == lane.n else rows  # every row: slices, not gathers
    slots = lane.slot[taken].copy()  # [R]: the pool keeps it as the resident states' key
    batch = len(slots)
    temperature = np.ascontiguousarray(lane.temperature[taken])  # [R] float64
    steps = np.arange(count, dtype=np.uint64)[:, None]  # [K, 1]
    uniforms = uniforms_at(np.broadcast_to(lane.key[taken], (count, batch)).ravel(),
                           (lane.position[taken][None, :] + steps).ravel()).reshape(count, batch)  # [K, R]
    planned = np.minimum(limits, count)  # [R]: what each row keeps unless the check disputes a draw
    started = time.perf_counter()
    forced_inputs, tokens, inputs, drawn, logits = runner.stretch_rows(
        slots, lane.waiting[taken][None, :].copy(), uniforms, temperature, planned)
    # [1, L, R, H], [K, R], [K, L, R, H], [K, R, V], [R, V]
    seconds = time.perf_counter() - started
    lane.stretch_step_seconds = seconds / (count + 1)  # the next call's ramp (lane_plan)
    if observer is not None:
        observer.observe_step(batch, seconds)
    kept = np.minimum(agreed_lengths(tokens, drawn, uniforms, temperature), limits)  # [R]
    disputed = (kept < planned).nonzero()[0]  # the pool holds their state after `planned`: one after `kept`
    if disputed.size:
        runner.put_states(slots[disputed], inputs[kept[disputed], :, disputed, :].transpose(1, 0, 2))  # [L, D, H]
    short = (kept < count).nonzero()[0]  # rows whose next logits are those after their last kept character
    if short.size:
        logits = logits.copy()
        logits[short] = drawn[kept[short], short]  # [S, V]
    ending = kept == lane.max_chars[taken] - lane.generated[taken]  # [R]: the call took them to max_chars
    ended = ending.nonzero()[0]
    ended_tokens = [tokens[: kept[p], p].tolist() for p in ended.tolist()]
    block = take_stretch(lane, rows, forced_inputs[0], tokens, inputs, kept, logits, iteration, ~ending)
    if observer is not None:
        observer.observe_stretch(int(np.minimum(limits, count).sum()), int(kept.sum()))
    return LaneCall(block, rows[ended], ended_tokens)


def take_stretch(lane: SteadyLane, rows: np.ndarray, forced_input: np.ndarray, tokens: np.ndarray,
                 inputs: np.ndarray, kept: np.ndarray, logits: np.ndarray, iteration: int,
                 sent: np.ndarray) -> CharBlock | None:
    """The lane's bookkeeping of a call over `rows` [R]: each consumed its waiting character
    (input states forced_input [L, R, H]) and kept[r] of the K it drew (tokens [K, R], input states
    inputs [K, L, R, H]); logits [R, V] are what each row's next character is drawn from. Returns
    the kept characters of the rows where `sent` [R] as one block, a row's in order (None when
    they kept none)."""
    n, count = lane.n, len(tokens)
    every = rows.size == n
    taken = slice(0, n) if every else rows
    lane_rows = lane._arange[:n] if every else rows
    first = lane._t + 1  # the lane step of the forced characters; drawn character k's is first + 1 + k
    window = lane.window
    lane._ring[first % window] = forced_input
    for k in range(count):
        lane._ring[(first + 1 + k) % window] = inputs[k]
    lane._t = first + count
    if not every or int(kept.min()) < count:  # some lane row consumed fewer characters than steps passed
        lane._partial_step = lane._t
    # win[row, c & (K' - 1)] = t << b | p for each character c consumed (generated chars stepped + 1 ..
    # stepped + 1 + kept), t its lane step and p the row's place in the call.
    offsets = np.arange(count + 1)[:, None]  # [K + 1, 1]
    consumed_mask = offsets <= kept[None, :]  # [K + 1, R]
    consumed = lane.stepped[taken][None, :] + 1 + offsets  # [K + 1, R]: generated char c, 1-based
    at = lane_rows[None, :] * (lane._k_mask + 1) + (consumed & lane._k_mask)  # [K + 1, R]
    entries = ((first + offsets) << lane._bits) | lane._arange[: rows.size][None, :]  # [K + 1, R]
    lane.win.ravel()[at[consumed_mask]] = entries[consumed_mask]
    # The kept characters, one line of `drawn` per drawn position (-1: not kept), as sample() writes.
    if lane._calls + count > TOKENS:
        lane._save_tokens()
    kept_mask = consumed_mask[1:]  # [K, R]: drawn character k is kept when k < kept
    lines = lane.drawn[lane._calls: lane._calls + count]  # [K, c]
    if every:
        lines[:, :n] = np.where(kept_mask, tokens, -1)
    else:
        lines[:, :n] = -1
        lines[:, rows] = np.where(kept_mask, tokens, -1)
    lane._calls += count
    if lane._calls == TOKENS:
        lane._save_tokens()
    lane.stepped[taken] += 1 + kept
    lane.generated[taken] += kept
    lane.position[taken] += kept.astype(np.uint64)  # plain rows: one random number a character
    lane._least_left -= count  # each row drew at most K characters
    lane.waiting[taken], lane.has_logits[taken], lane.last_step[taken] = -1, True, iteration
    if every:
        lane._step_logits = logits  # [n, V]: the call's own output, no copy (SteadyLane._owned_logits)
    else:
        lane._owned_logits()
        lane.logits[rows] = logits
    if not sent.all():
        kept, kept_mask = np.where(sent, kept, 0), kept_mask & sent[None, :]
    if not kept.any():
        return None
    return CharBlock(np.repeat(lane.rid[taken], kept), tokens.T[kept_mask.T], several=True)  # a row's in order
