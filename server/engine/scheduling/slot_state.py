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
from typing import Callable

import numpy as np

from server.engine.generation import (
    SHUTDOWN,
    GenerationRequest,
    RequestStatus,
    StopMatcher,
    StreamEvent,
    recent_tail,
)
from server.engine.scheduling.undo_window import UndoWindow


@dataclass(frozen=True)
class SlotSnapshot:
    """A session's model state, portable between slots, servers and time (see sessions/record.py).

    Continuing from it is exact: feed `pending` to the model starting from `hidden`,
    or, when nothing is pending, sample from `logits`.
    """

    hidden: np.ndarray  # [L, H] float32: the state before `pending` is consumed
    logits: np.ndarray | None  # [V] float32 after the last consumed token; None while tokens are pending
    pending: tuple[int, ...]  # token ids not yet consumed by a model step
    stream_key: int  # the random stream's key (from the seed), 0 <= key < 2**64
    position: int  # random numbers drawn so far
    consumed_chars: int  # prompt and delivered characters in the state
    recent_text: str  # the last of them (generation.RECENT_CHARS at most)


@dataclass(eq=False)
class Request:
    """One generation (engine thread only); callers address it by id."""

    id: int
    slot: int
    spec: GenerationRequest
    status: RequestStatus
    matcher: StopMatcher
    start_position: int  # the session's random-stream position when generation began
    plain: bool = False  # samples with a temperature alone (sampling.SamplingSettings.samples_plainly)
    tokens: list[int] = field(default_factory=list)  # generated token ids, in order
    delivered: int = 0  # characters its caller has handed to the client
    stepped: int = 0  # generated characters already consumed by a model step
    start_logits: np.ndarray | None = None  # [V] the first character was sampled from
    window: UndoWindow = field(default_factory=UndoWindow)  # k -> [L, H] state before consuming char k
    numpy_draws: bool = False  # the stretch graph's draw of the next character was disputed: NumPy draws it


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
    capture: str | None = None  # prompt text whose state goes to the prefix cache once consumed


def prompt_progress(request: Request, state: SlotState) -> None:
    """A step (or a prefill) consumed some of the request's prompt characters: its status moves on."""
    if request.status is RequestStatus.WAITING:
        request.status = RequestStatus.CONSUMING_PROMPT
    if not state.pending and request.status is RequestStatus.CONSUMING_PROMPT:
        request.status = RequestStatus.GENERATING


def acknowledge(request: Request, delivered: int) -> None:
    """The caller has handed `delivered` characters to its client in all: what undoing to fewer
    would need is dropped (window[m] stays: undoing to m delivered needs it)."""
    request.delivered = max(request.delivered, min(delivered, len(request.tokens)))
    request.window.drop_below(max(request.delivered, 1))
    if request.delivered > 0:
        request.start_logits = None


def rewind(state: SlotState, request: Request, m: int) -> None:
    """Return the session to the state after the first m generated characters."""
    state.position = request.start_position + (0 if request.spec.settings.greedy else m)
    if m == 0:
        # Back to the state the first character was sampled from.
        state.pending.clear()
        state.logits = request.start_logits
        if request.stepped >= 1:
            state.start = owned(request.window[1])
    else:
        # The state before consuming char m, with char m waiting to be consumed again.
        if request.stepped >= m:
            state.start = owned(request.window[m])
        state.pending = collections.deque([request.tokens[m - 1]])
        state.logits = None


def owned(kept: np.ndarray | None) -> np.ndarray | None:
    """`kept` itself, or a copy when it is a view (of a whole step's input or
    output, which an idle session would otherwise keep alive until its next step)."""
    return kept.copy() if kept is not None and kept.base is not None else kept


def own_window(request: Request) -> None:
    """Replace the window's views of whole step inputs by copies of the request's own rows.

    Views cost nothing while a stream keeps up: the steps they pin are the last
    lookahead + 1, shared by every stream. A stream that stalls at its lookahead
    would keep those steps alive for as long as it stalls, so then it copies its
    rows (at most lookahead + 1 states of [L, H]) and pins nothing else."""
    request.window.own()


def snapshot_of(state: SlotState, pooled: Callable[[], np.ndarray], decode: Callable[[list[int]], str]) -> SlotSnapshot:
    """The session's state as it stands for its caller: with a generation running, the state
    after the characters delivered so far (what undoing the rest would leave); `pooled()` reads
    the slot's pooled state [L, H]."""
    request = state.request
    if request is None or not request.tokens:
        hidden = state.start if state.start is not None else pooled()
        logits = None if state.pending else _copy(state.logits)  # logits only of a state with nothing queued
        return SlotSnapshot(np.array(hidden, np.float32), logits, tuple(state.pending),
                            state.key, state.position, state.consumed, state.recent)
    m = request.delivered
    # Sampling waits for an empty queue, so at most one generated character is unconsumed:
    # stepped >= len(tokens) - 1 >= m - 1, and the state before char m is window[m] or the current one.
    if m == 0:
        hidden = request.window[1] if request.stepped >= 1 else _current(state, pooled)
        logits, pending = _copy(request.start_logits), ()
    else:
        hidden = request.window[m] if request.stepped >= m else _current(state, pooled)
        logits, pending = None, (request.tokens[m - 1],)
    position = request.start_position + (0 if request.spec.settings.greedy else m)
    delivered = request.tokens[:m]
    return SlotSnapshot(np.array(hidden, np.float32), logits, pending, state.key, position,
                        state.consumed + m, recent_tail(state.recent, decode(delivered)))


def restored(snapshot: SlotSnapshot) -> SlotState:
    """A slot's state continuing exactly from `snapshot`: its hidden state overrides the pool."""
    return SlotState(
        key=snapshot.stream_key,
        position=snapshot.position,
        pending=collections.deque(snapshot.pending),
        logits=_copy(snapshot.logits),
        start=np.array(snapshot.hidden, np.float32),
        consumed=snapshot.consumed_chars,
        recent=snapshot.recent_text,
    )


def _current(state: SlotState, pooled: Callable[[], np.ndarray]) -> np.ndarray:
    return state.start if state.start is not None else pooled()


def _copy(array: np.ndarray | None) -> np.ndarray | None:
    return None if array is None else np.array(array, np.float32)


def lose(state: SlotState) -> Request | None:
    """Mark a state that a failed step left untrustworthy; detach and return its request.
    Dropping its tokens also keeps a persistent failure from being retried in a tight loop."""
    state.pending.clear()
    state.logits, state.lost = None, True
    request, state.request = state.request, None
    return request


def refusal_of(state: SlotState | None, spec: GenerationRequest, draining: bool) -> StreamEvent | None:
    """Why a generation cannot start on this state (the event that tells its caller), or None."""
    if state is None or state.request is not None:
        return StreamEvent(error="the session is closed or already generating", refused=True)
    if draining:
        return StreamEvent(finish=SHUTDOWN, refused=True)
    if state.lost:
        message = "the session's state was lost in a failed model step: reset or delete the session"
        return StreamEvent(error=message, error_is_precondition=True, refused=True)
    if not state.pending and state.logits is None and not spec.prompt_tokens:
        message = "the session has consumed no text yet: send a prompt"
        return StreamEvent(error=message, error_is_precondition=True, refused=True)
    return None
