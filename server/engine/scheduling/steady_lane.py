"""The steady lane: running generations whose per-step bookkeeping is a few array operations.

A request that is plainly running (generating, at least one character out, no
stop strings, not about to reach max_chars, nothing queued but its sampled
character) does the same few things every iteration: draw a character from
its logits with its own random number, queue it, have a step consume it,
keep the state that step started from (its undo window), and take the
caller's acknowledgements. Done per row in Python that costs microseconds a
row, which grows with the batch; on a GPU, where a step at batch 1024 costs
what one at batch 1 does, it is the whole limit. The lane holds those
requests as columns of arrays indexed by lane row, so an iteration costs the
same few dozen NumPy calls at any batch size:

    key, position [n] uint64     the random stream (sampling.py), per row
    temperature, top_k, top_p    the settings; greedy rows draw nothing
    generated, delivered, stepped [n]   the request's counters
    logits [n, V], has_logits    what the next character is drawn from (after a step that took
                                 every row: that step's own logits, not copied; see _owned_logits)
    waiting [n]                  the sampled character a step has yet to consume (-1: none)
    win [n, K]                   where the state before generated char k lies, at k & (K - 1)
                                 (K: W rounded up to a power of two, a mask, not a division): lane
                                 step t and row p of its inputs (ring of W steps) as t << b | p,
                                 b the bits of a row (a step has at most `capacity` rows)
    drawn [TOKENS, n]            the characters of the last sample calls (up to TOKENS), one
                                 line a call (-1: the row drew none): one contiguous write a
                                 call. When it fills, each row's are saved as an array of its own
                                 (saved), and they are written to the Request's list when it
                                 leaves: a list of ints costs ~20 ns a character to build

The Request and SlotState objects stay the truth for everything else, and
are brought up to date (`leave`) before anything but the lane's own
iteration reads them: a snapshot, an abort, a close, the last character
(max_chars), a failed step, or draining. A row whose oldest undo state would
fall out of the ring (a reader stalled for W steps) copies its undo states
out to its Request instead and stays (spill). The text is the one the
per-row path gives: the same sampler functions on the same logits and random
numbers (sample_tokens and sample_uncut agree bit for bit), the same states.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from server.engine.generation import CharBlock, RequestStatus
from server.engine.sampling import sample_tokens, sample_uncut, uniforms_at
from server.engine.scheduling.slot_state import (
    Request,
    SlotState,
    acknowledge,
    own_window,
)

_NONE = np.zeros(0, np.int64)  # no rows (read only: callers test .size)
TOKENS = 1024  # sample calls `drawn` holds before every row's characters are saved (a rare O(n) pass)


class SteadyLane:
    def __init__(self, capacity: int, vocab_size: int, lookahead: int, stretch_most: int = 0):
        self.lookahead, self.n = lookahead, 0
        # A call advances the lane by at most `advance` steps: 1, or a stretch's forced character
        # and the `stretch_most` it samples (lane_stretch.py): one lane step a character consumed.
        self.advance = 1 + max(0, stretch_most)
        # W: a row that keeps up holds at most lookahead + 1 undo states, and a call must not
        # overwrite them while it writes its own.
        self.window = lookahead + 1 + self.advance
        self.stretch_step_seconds = 0.0  # the last stretch call's seconds per step (lane_stretch.py)
        c, w = capacity, self.window
        self._k_mask = (1 << (w - 1).bit_length()) - 1  # K - 1, K >= W: a row's live k are distinct mod K
        self._bits = max(1, (c - 1).bit_length())  # b: 10 for 1,024 slots, leaving t 53 bits
        self.slot = np.zeros(c, np.int64)
        self.rid = np.zeros(c, np.int64)
        self.key = np.zeros(c, np.uint64)
        self.position = np.zeros(c, np.uint64)
        self.temperature = np.zeros(c, np.float64)
        self.top_k = np.zeros(c, np.int64)
        self.top_p = np.ones(c, np.float64)
        self.draws = np.zeros(c, np.uint64)  # random numbers a character costs: 0 greedy, else 1
        self.plain = np.zeros(c, bool)
        self.max_chars = np.zeros(c, np.int64)
        self.generated = np.zeros(c, np.int64)
        self.delivered = np.zeros(c, np.int64)
        self.stepped = np.zeros(c, np.int64)
        # stepped when the row entered or last spilled: the undo states up to it are the Request's
        self.entered = np.zeros(c, np.int64)
        self.last_step = np.zeros(c, np.int64)
        self.logits = np.zeros((c, vocab_size), np.float32)  # [n, V]
        # A step that took every row leaves their logits in its own output (a fresh array each
        # step, which the per-row path keeps views of too): rows 0 .. n-1 read them there, and
        # `logits` is brought up to date only when a row enters, leaves, or misses a step.
        self._step_logits: np.ndarray | None = None  # [n, V]
        self.has_logits = np.zeros(c, bool)
        self.waiting = np.full(c, -1, np.int64)
        self.win = np.zeros((c, self._k_mask + 1), np.int64)  # [n, K]: one entry (one cache line) a character
        self.drawn = np.full((TOKENS, c), -1, np.int32)  # [TOKENS, n]
        self._calls = 0  # lines of `drawn` in use: sample calls since the last save
        self.requests: list[Request] = []  # lane row -> its Request, SlotState (for leave)
        self.saved: list[list[np.ndarray]] = []  # lane row -> its characters' earlier blocks, in order
        self.states: list[SlotState] = []
        self.row_of_request: dict[int, int] = {}
        self.row_of_slot: dict[int, int] = {}
        self._ring: list[np.ndarray | None] = [None] * w  # lane step t's inputs [L, B, H] at t % W
        self._t = 0  # lane steps taken
        self._arange = np.arange(c)
        # Bounds that let an iteration skip whole-lane checks that cannot find a row (each is
        # conservative: a check skipped is one that would have found nothing).
        self._least_left = 0  # <= every row's max_chars - generated (finishing)
        self._partial_step = 0  # the last lane step that left a lane row out (expiring)
        self._order: np.ndarray | None = None  # argsort of rid[:n] (ack), None when rows moved
        self._last_ack: tuple[np.ndarray, ...] | None = None  # (order, request ids, ours, rows) of the last ack

    def __len__(self) -> int:
        return self.n

    # ---- rows entering and leaving ----

    def enter(self, request: Request, state: SlotState) -> None:
        """Take a plainly running request whose logits are ready and nothing queued, or whose
        sampled character alone is queued (the scheduler checks: may_enter). Its SlotState's
        logits, or that character, move here."""
        self._owned_logits()
        row, settings = self.n, request.spec.settings
        self.n += 1
        self.slot[row], self.rid[row] = request.slot, request.id
        self.key[row], self.position[row] = state.key, state.position
        self.temperature[row], self.top_k[row], self.top_p[row] = settings.temperature, settings.top_k, settings.top_p
        self.draws[row], self.plain[row] = (0 if settings.greedy else 1), request.plain
        self.max_chars[row], self.generated[row] = request.spec.max_chars, len(request.tokens)
        self.delivered[row], self.stepped[row] = request.delivered, request.stepped
        self.entered[row], self.last_step[row] = request.stepped, state.last_step
        sampled = state.logits is None  # its character is drawn and queued: the next step consumes it
        if not sampled:
            self.logits[row] = state.logits
        self.has_logits[row], self.waiting[row] = not sampled, state.pending.popleft() if sampled else -1
        self.drawn[: self._calls, row] = -1  # none of this block's calls drew for it
        state.logits = None  # the lane's from here on
        own_window(request)  # undo states from before stay the Request's: as copies, pinning no whole step
        self.requests.append(request)
        self.saved.append([])
        self.states.append(state)
        self.row_of_request[request.id] = self.row_of_slot[request.slot] = row
        self._least_left = min(self._least_left, request.spec.max_chars - len(request.tokens))
        self._order = None

    def leave(self, rows: Sequence[int] | np.ndarray) -> list[Request]:
        """Write the rows back to their Request and SlotState and drop them from the lane; returns
        their requests (a sampled character not yet consumed is queued in the state again)."""
        left = []
        self._owned_logits()
        for row in sorted((int(r) for r in rows), reverse=True):  # the last row moves into a freed one
            request, state = self.requests[row], self.states[row]
            recent = self.drawn[: self._calls, row]  # [calls]
            blocks = [*self.saved[row], recent[recent >= 0]]
            request.tokens.extend(np.concatenate(blocks).tolist())
            request.stepped = int(self.stepped[row])
            self._copy_out_undo_states(row)  # owned: the ring moves on
            state.position = int(self.position[row])
            state.logits = self.logits[row].copy() if self.has_logits[row] else None
            state.last_step = int(self.last_step[row])
            if self.waiting[row] >= 0:
                state.pending.append(int(self.waiting[row]))
            left.append(request)
            request.numpy_draws = False
            acknowledge(request, int(self.delivered[row]))
            self._remove(row)
        return left

    def spill(self, rows: np.ndarray) -> None:
        """Rows whose oldest undo state the next lane step would push out of the ring (expiring():
        their reader stalled while the others stepped): those states move to the Request's window,
        and the rows stay. Leaving instead costs a row its whole write-back and a later entry, and
        where steps are fast (a small model, a GPU) a reader lags that many steps often."""
        for row in rows.tolist():
            # What the lane's acknowledgements released goes first: the window holds at most the
            # lookahead's states however often a row spills.
            self.requests[row].window.drop_below(max(int(self.delivered[row]), 1))
            self._copy_out_undo_states(row)

    def _copy_out_undo_states(self, row: int) -> None:
        """The ring's undo states of `row` (characters entered + 1 .. stepped still undoable) into
        its Request's window as one owned block [n, L, H]; from then on those are the Request's."""
        first, last = max(int(self.delivered[row]), 1, int(self.entered[row]) + 1), int(self.stepped[row])
        if first <= last:
            self.requests[row].window.put_block(first, self.undo_states(row, first, last))
        self.entered[row] = last

    def undo_states(self, row: int, first: int, last: int) -> np.ndarray:
        """The states before generated characters first .. last of `row` (lane steps consumed them),
        copied into one array: [last - first + 1, L, H]."""
        entries = self.win[row, np.arange(first, last + 1) & self._k_mask]  # [n]: t << b | position
        steps = ((entries >> self._bits) % self.window).tolist()
        positions = (entries & ((1 << self._bits) - 1)).tolist()
        return np.stack([self._ring[t][:, p, :] for t, p in zip(steps, positions)])  # type: ignore[index]

    def _owned_logits(self) -> None:
        """Every row's logits into the lane's own array (before rows move, enter or miss a step)."""
        if self._step_logits is not None:
            self.logits[: self.n] = self._step_logits
            self._step_logits = None

    def _remove(self, row: int) -> None:
        self._owned_logits()
        last = self.n - 1
        self._order = None
        del self.row_of_request[int(self.rid[row])], self.row_of_slot[int(self.slot[row])]
        if row != last:  # every column's last row into the freed one
            for column in (self.slot, self.rid, self.key, self.position, self.temperature, self.top_k, self.top_p,
                           self.draws, self.plain, self.max_chars, self.generated, self.delivered, self.stepped,
                           self.entered, self.last_step, self.logits, self.has_logits, self.waiting, self.win):
                column[row] = column[last]
            self.drawn[: self._calls, row] = self.drawn[: self._calls, last]
            self.requests[row], self.states[row], self.saved[row] = self.requests[last], self.states[last], self.saved[last]
            self.row_of_request[int(self.rid[row])], self.row_of_slot[int(self.slot[row])] = row, row
        self.requests.pop()
        self.saved.pop()
        self.states.pop()
        self.n = last

    # ---- one iteration ----

    def finishing(self) -> np.ndarray:
        """Rows that may sample the character max_chars ends them with: the per-row path draws it
        (its event finishes the request)."""
        n = self.n
        if self._least_left > 1:  # no row is within a character of its max_chars
            return _NONE
        left = self.max_chars[:n] - self.generated[:n]  # [n]
        self._least_left = int(left.min()) if n else 0
        return (self.has_logits[:n] & (left <= 1) & (self.generated[:n] - self.delivered[:n] < self.lookahead)
                ).nonzero()[0]

    def expiring(self) -> np.ndarray:
        """Rows whose oldest undo state the next lane step would push out of the ring (their reader
        stalled while the others stepped): spill() copies those states out first."""
        n = self.n
        # None can while the last `lookahead` lane steps took every lane row. A row holds undo
        # states for characters oldest .. stepped, where oldest >= delivered, so at most
        # generated - delivered <= lookahead of them (a row samples only below its lookahead). Had
        # every step since its oldest was consumed (lane step `held`) taken it, it consumed one
        # character per step: t - held <= lookahead, so held > t + advance - W (W = lookahead + 1 + advance). A
        # row left out of some step, but of none of the last `lookahead`, consumed a character in
        # each of those: its oldest was consumed within them, the same case.
        # The next call overwrites the ring's entries of lane steps t + 1 - W .. t + advance - W,
        # which, by the same count, are older than any such row's oldest.
        if self._t - self._partial_step > self.lookahead:
            return _NONE
        oldest = np.maximum(np.maximum(self.delivered[:n], 1), self.entered[:n] + 1)  # [n]
        live = oldest <= self.stepped[:n]
        held = self.win[self._arange[:n], oldest & self._k_mask] >> self._bits  # [n]: the lane step
        return (live & (held <= self._t + self.advance - self.window)).nonzero()[0]

    def sample(self) -> CharBlock | None:
        """Draw the next character of every row that may run ahead; None when none may."""
        n = self.n
        generated = self.generated[:n]
        rows = (self.has_logits[:n] & (generated - self.delivered[:n] < self.lookahead)).nonzero()[0]  # [R]
        if rows.size == 0:
            return None
        if rows.size == n:  # every row (the steady state): slices, cheaper than gathers
            rows = slice(0, n)  # type: ignore[assignment]
        logits = (self.logits if self._step_logits is None else self._step_logits)[rows]  # [R, V]
        uniforms = uniforms_at(self.key[rows], self.position[rows])  # [R]
        if self.plain[rows].all():
            tokens = sample_uncut(logits, self.temperature[rows], uniforms)  # [R]
        else:
            tokens = sample_tokens(logits, self.temperature[rows], self.top_k[rows], self.top_p[rows], uniforms)
        self.position[rows] += self.draws[rows]
        self.waiting[rows], self.has_logits[rows] = tokens, False
        line = self.drawn[self._calls]  # [c]
        if isinstance(rows, slice):
            line[:n] = tokens
        else:
            line[:n] = -1
            line[rows] = tokens
        self._calls += 1
        self.generated[rows] += 1
        self._least_left -= 1  # each row drew at most one character
        if self._calls == TOKENS:
            self._save_tokens()
        return CharBlock(self.rid[rows].copy(), tokens)  # a copy: rows move when others leave

    def _save_tokens(self) -> None:
        """Every row's characters of the calls in `drawn` as an array of its own (a copy: a view would
        keep the whole block alive while any row of it stays)."""
        for saved, characters in zip(self.saved, self.drawn[: self._calls, : self.n].T):  # [n, calls]
            saved.append(characters[characters >= 0])
        self._calls = 0

    def ready(self) -> np.ndarray:
        """Rows with a sampled character for the next step to consume."""
        return (self.waiting[: self.n] >= 0).nonzero()[0]

    def take_step(self, rows: np.ndarray, logits: np.ndarray, inputs: np.ndarray, offset: int,
                  iteration: int) -> None:
        """A step consumed `rows`' characters as its rows offset, offset + 1, ...: logits [B, V] and
        inputs [L, B, H] are the whole step's."""
        self._t += 1
        n = self.n
        every = rows.size == n  # ready() is sorted: then rows is 0 .. n-1, and slices serve
        if not every:
            self._partial_step = self._t
        taken = slice(0, n) if every else rows
        positions = offset + self._arange[: rows.size]  # [R]
        consumed = self.stepped[taken] + 1  # [R]: generated char k, 1-based
        # win[rows, k & (K - 1)] through its flat view.
        at = (self._arange[:n] if every else rows) * (self._k_mask + 1) + (consumed & self._k_mask)  # [R]
        self.win.ravel()[at] = positions + (self._t << self._bits)
        self._ring[self._t % self.window] = inputs
        self.stepped[taken] = consumed
        if every:
            self._step_logits = logits[offset: offset + n]  # [n, V], a view: no copy
        else:
            self._owned_logits()
            self.logits[taken] = logits[positions]
        self.has_logits[taken], self.waiting[taken], self.last_step[taken] = True, -1, iteration

    def ack(self, request_ids: np.ndarray, delivered: np.ndarray) -> np.ndarray | None:
        """Acknowledgements (request id [N], characters delivered in all [N]): the lane's applied;
        returns the mask of the others (requests not in the lane), None when there are none."""
        n = self.n
        if n == 0:
            return np.ones(len(request_ids), bool)
        if self._order is None:
            self._order = np.argsort(self.rid[:n])
        order = self._order
        last = self._last_ack
        # The same ids as the last call, with no row moved since (order is a new array when one
        # does): the same rows. A steady stream of acks repeats its ids pass after pass.
        if last is not None and last[0] is order and np.array_equal(last[1], request_ids):
            ours, rows = last[2], last[3]
        else:
            ids = self.rid[:n][order]  # [n] sorted
            at = np.minimum(np.searchsorted(ids, request_ids), n - 1)  # [N]
            ours = ids[at] == request_ids  # [N]
            rows = order[at[ours]]
            if len(request_ids) == rows.size == n and np.array_equal(rows, self._arange[:n]):  # every row, in order
                rows = slice(0, n)  # (streams acknowledged in the order they entered): slices, no gathers
            self._last_ack = (order, request_ids.copy(), ours, rows)
        if isinstance(rows, slice):
            delivered_rows = self.delivered[rows]  # [n], a view: updated in place
            np.maximum(delivered_rows, np.minimum(delivered, self.generated[rows]), out=delivered_rows)
            return None
        self.delivered[rows] = np.maximum(self.delivered[rows], np.minimum(delivered[ours], self.generated[rows]))
        return ~ours

    def ack_one(self, row: int, delivered: int) -> None:
        self.delivered[row] = max(int(self.delivered[row]), min(delivered, int(self.generated[row])))

    def has_work(self) -> bool:
        n = self.n
        return bool((self.waiting[:n] >= 0).any() or (self.has_logits[:n] & (
            self.generated[:n] - self.delivered[:n] < self.lookahead)).any())

    def ahead(self) -> np.ndarray:
        """Characters each row runs ahead of its caller: [n]."""
        return self.generated[: self.n] - self.delivered[: self.n]


def may_enter(request: Request, state: SlotState, lookahead: int, stretches: bool, pools_start: bool,
              sampled: bool = False) -> bool:
    """Whether a request belongs in the lane: generating with a character out, no stop strings,
    at least two characters before max_chars, its logits ready and nothing queued (or, with
    `sampled`, the character just drawn from them alone queued), room to run ahead, and none of
    the stretch graph's paths outside the lane take it (`stretches`: they take plain-temperature
    requests). A state overriding the pool's (a stretch's outside the lane) must first go into
    the pool, which the caller does where `pools_start`."""
    generated = len(request.tokens)
    if sampled:
        ready = (state.logits is None and len(state.pending) == 1 and request.stepped == generated - 1
                 and generated - request.delivered <= lookahead)
    else:
        ready = state.logits is not None and not state.pending and generated - request.delivered < lookahead
    return (ready and request.status is RequestStatus.GENERATING and generated >= 1 and not request.matcher.stops
            and generated + 1 < request.spec.max_chars and not (stretches and request.plain)
            and (state.start is None or pools_start) and not state.lost)
