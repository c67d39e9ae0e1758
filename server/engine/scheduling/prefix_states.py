"""The prefix-state cache at work in the scheduler (engine thread only).

A fresh session (zero state) whose prompt starts with a cached text starts
after that text; the state after a whole prompt is cached once a step has
consumed it. Exact: the cache holds the very state and logits that consuming
the text produced, and a cached state is fed to the next step unchanged.
"""

from __future__ import annotations

import collections

import numpy as np

from server.engine.observer import StepObserver
from server.engine.prefix_cache import PrefixCache
from server.engine.runner.model_runner import ModelRunner
from server.engine.scheduling.slot_state import SlotSnapshot, SlotState


class PrefixStates:
    def __init__(self, cache: PrefixCache | None, runner: ModelRunner, observer: "StepObserver | None"):
        self.cache = cache
        self._runner = runner
        self._observer = observer

    def start(self, state: SlotState, prompt_tokens: list[int], text: str) -> None:
        """`state` was just reset to zeros with `prompt_tokens` (whose text is `text`) queued."""
        state.capture = None
        if self.cache is None or not prompt_tokens:
            return
        hit = self.cache.lookup(text)
        skipped = 0 if hit is None else len(hit.text)
        if hit is not None:
            state.start = hit.hidden  # [L, H]
            state.pending = collections.deque(prompt_tokens[skipped:])
            state.logits = None if state.pending else hit.logits  # [V]
        if skipped < len(text):
            state.capture = text
        if self._observer is not None:
            self._observer.observe_prefix_cache(hit is not None, skipped, self.cache)

    def start_restored(self, state: SlotState, snapshot: SlotSnapshot, text: str) -> None:
        """`state` was just restored from `snapshot`: one stored with its prompt unconsumed (a
        shared store's CreateSession) starts after its cached prefix like a fresh session."""
        fresh = snapshot.logits is None and snapshot.consumed_chars == len(snapshot.pending)
        if fresh and snapshot.pending and not np.any(snapshot.hidden):
            self.start(state, list(snapshot.pending), text)

    def capture(self, stepped: list[tuple[int, SlotState]]) -> None:
        """After a step over `stepped` (slot, state): cache the states of prompts consumed in full."""
        if self.cache is None:
            return
        done = [(slot, state) for slot, state in stepped if state.capture is not None and not state.pending]
        if not done:
            return
        # A state consumed outside the pool (a lone session's Loop call, stretch.py) is its start state.
        columns = {slot: column for column, slot in enumerate(slot for slot, state in done if state.start is None)}
        hidden = self._runner.read_states(np.array(list(columns))) if columns else None  # [L, C, H]
        for slot, state in done:
            assert state.capture is not None and state.logits is not None
            kept = state.start if state.start is not None else hidden[:, columns[slot], :]  # type: ignore[index]
            self.cache.insert(state.capture, kept, state.logits)
            state.capture = None
