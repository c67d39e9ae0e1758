"""What the scheduler keeps per session (SlotState) and per request (Request), and how a
request's undelivered characters are undone (rewind).

Undoing rests on the request's window: every model step that consumes a
generated character k keeps the state it started from (window[k], [L, H]),
for the characters not yet delivered. Rewinding to m delivered characters
restores the state from before character m and queues m again (or, for m = 0,
the state and logits the first character was sampled from), and rewinds the
counter-based random stream to where it stood after character m.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

import numpy as np

from server.generation import GenerationRequest, RequestStatus, StopMatcher


@dataclass(eq=False)
class Request:
    """One generation (engine thread only); callers address it by id."""

    id: int
    slot: int
    spec: GenerationRequest
    status: RequestStatus
    matcher: StopMatcher
    start_position: int  # the session's random-stream position when generation began
    tokens: list[int] = field(default_factory=list)  # generated token ids, in order
    delivered: int = 0  # characters its caller has handed to the client
    stepped: int = 0  # generated characters already consumed by a model step
    start_logits: np.ndarray | None = None  # [V] the first character was sampled from
    window: dict[int, np.ndarray] = field(default_factory=dict)  # k -> [L, H] state before consuming char k


@dataclass(eq=False)
class SlotState:
    """One session's model state (engine thread only)."""

    key: int  # random stream key (from the seed)
    position: int = 0  # random numbers drawn so far
    pending: collections.deque = field(default_factory=collections.deque)  # token ids not yet consumed
    logits: np.ndarray | None = None  # [V] after the last consumed token; None while tokens wait
    start: np.ndarray | None = None  # [L, H] the next step starts from (zeros = fresh) instead of the pool
    consumed: int = 0  # prompt and delivered characters in the state
    recent: str = ""  # the last of them
    request: Request | None = None
    last_step: int = -1  # iteration of this slot's last step (batch fairness)
    lost: bool = False  # a failed step lost tokens of this state: unusable until reset


def rewind(state: SlotState, request: Request, m: int) -> None:
    """Return the session to the state after the first m generated characters."""
    state.position = request.start_position + (0 if request.spec.settings.greedy else m)
    if m == 0:
        # Back to the state the first character was sampled from.
        state.pending.clear()
        state.logits = request.start_logits
        if request.stepped >= 1:
            state.start = request.window[1]
    else:
        # The state before consuming char m, with char m waiting to be consumed again.
        if request.stepped >= m:
            state.start = request.window[m]
        state.pending = collections.deque([request.tokens[m - 1]])
        state.logits = None

