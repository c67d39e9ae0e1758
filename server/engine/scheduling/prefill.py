"""Prefill, the policy: which queued characters one model call consumes at once.

A prompt's characters are known in advance, so a run of them needs no sampling
between steps: model_runner.prefill consumes it in one call (the graph is
prefill_graph.py). A session with more than PREFILL_MIN_CHARS known characters
queued (a prompt, nothing generated yet) consumes all but the last of up to
PREFILL_CHUNK of them that way, but only while the step has at most
PREFILL_MAX_BATCH rows: a Loop runs at batch 1, so with many sessions ingesting
at once their shared batched steps cost less per character. The chunk bounds
how long the other rows of the step wait (64 characters: ~5 ms int8, ~13 ms
fp32 on a 2-core CPU). The last character goes through the scheduler's
ordinary step, which yields the logits and the prefix-cache capture as for any
prompt.
"""

from __future__ import annotations

import logging
from typing import Callable

import numpy as np

from server.engine.generation import RequestStatus
from server.engine.runner.model_runner import ModelRunner
from server.engine.scheduling.slot_state import SlotState, prompt_progress

logger = logging.getLogger("charstream.server")

PREFILL_MIN_CHARS = 16
PREFILL_CHUNK = 64
PREFILL_MAX_BATCH = 4


def prefill(runner: ModelRunner, ready: list[tuple[int, SlotState]],
            fail: Callable[[SlotState, Exception], None]) -> list[tuple[int, SlotState]]:
    """Prefill every slot of `ready` (slot, state) with a long run of known characters queued;
    `fail` is called for a slot whose call raised (as for a failed step). Returns the slots that
    still have characters queued for the ordinary step."""
    for slot, state in ready:
        request = state.request
        if len(state.pending) <= PREFILL_MIN_CHARS or (request is not None
                                                        and request.status is RequestStatus.GENERATING):
            continue  # a generating request's queue holds a sampled character: it steps with its window
        count = min(len(state.pending) - 1, PREFILL_CHUNK)
        tokens = np.fromiter((state.pending[i] for i in range(count)), np.int64, count)  # [T]
        try:
            state.start = runner.prefill(tokens, state.start, slot)  # [L, H]
        except Exception as exc:  # noqa: BLE001 - as a failed step: this slot only
            logger.exception("prefill failed")
            fail(state, exc)
            continue
        for _ in range(count):
            state.pending.popleft()
        if request is not None:
            prompt_progress(request, state)
    return [(slot, state) for slot, state in ready if state.pending]
