"""A request's undo window: for each generated character k not yet delivered, the state the
model step that consumed it started from (window[k], [L, H]).

An ordinary step keeps one state per row, as a view of the step's input. A batch's stretch
consumes up to K characters per row in one call; keeping them as K entries meant K views
created and K dictionary writes per row per call, and as many deletions when they are
acknowledged, which at a few hundred rows was a tenth of the engine's time. So a call's
states for one row are kept as one block: the row's [K, L, H] view of the call's inputs under
the key of its first character. Reading a key looks in the single entries, then in the
blocks. Keys only grow (a request's generated characters are consumed in order, once), so
no key is in both.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np


class UndoWindow:
    """k -> [L, H]: the mapping the scheduler reads (window[k], iteration, values, items), with
    single entries and blocks of consecutive keys; keys below the floor are gone."""

    __slots__ = ("_single", "_blocks", "_floor")

    def __init__(self) -> None:
        self._single: dict[int, np.ndarray] = {}
        self._blocks: list[tuple[int, np.ndarray]] = []  # (first key, states [n, L, H]), oldest first
        self._floor = 1  # keys below it were dropped (acknowledged)

    def __setitem__(self, k: int, state: np.ndarray) -> None:
        self._single[k] = state

    def put_block(self, first: int, states: np.ndarray) -> None:
        """Keys first .. first + len(states) - 1 hold states[0], states[1], ... ([n, L, H])."""
        if len(states):
            self._blocks.append((first, states))

    def __getitem__(self, k: int) -> np.ndarray:
        state = self._single.get(k)
        if state is not None:
            return state
        if k >= self._floor:
            for first, states in self._blocks:
                if first <= k < first + len(states):
                    return states[k - first]
        raise KeyError(k)

    def drop_below(self, floor: int) -> None:
        """Forget the states of keys below `floor` (delivered characters need none)."""
        if self._single:  # a batch's stretches keep blocks alone: nothing to pop key by key
            for k in range(self._floor, floor):  # keys are consecutive: no scan of the entries
                self._single.pop(k, None)
        self._floor = max(self._floor, floor)
        blocks = self._blocks
        while blocks and blocks[0][0] + len(blocks[0][1]) <= self._floor:
            blocks.pop(0)

    def own(self) -> None:
        """Each state a copy of its own row, not a view of a whole call's or step's output
        (which a stalled or finished request would otherwise keep alive). A block that is a
        view becomes single entries; one that is an array of its own (the steady lane's copies)
        stays: it holds this request's states and nothing else."""
        for k, state in self._single.items():
            if state.base is not None:
                self._single[k] = state.copy()
        kept = []
        for first, states in self._blocks:
            if states.base is None:
                kept.append((first, states))
                continue
            for i in range(max(0, self._floor - first), len(states)):
                self._single[first + i] = states[i].copy()
        self._blocks = kept

    def __iter__(self) -> Iterator[int]:
        yield from self._single
        for first, states in self._blocks:
            yield from range(max(first, self._floor), first + len(states))

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __bool__(self) -> bool:
        return bool(self._single) or any(first + len(states) > self._floor for first, states in self._blocks)

    def values(self) -> Iterator[np.ndarray]:
        return (self[k] for k in self)

    def items(self) -> Iterator[tuple[int, np.ndarray]]:
        return ((k, self[k]) for k in self)
