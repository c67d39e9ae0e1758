"""A lone session's model calls: its queued characters, then a stretch of sampled ones, in one call.

With one session stepping and nothing else waiting, every character used to
cost an engine iteration: sample one row in NumPy, one model call,
bookkeeping. On a fast CPU that Python costs half as much again as the model
step. So a lone session's step goes through the Loop graph of
stretch_graph.py instead: one ONNX Runtime call consumes the F characters it
has queued (its prompt, or a character NumPy sampled) and then, for a
request sampling with a plain temperature, K more that the graph samples with
the session's own random numbers, so the text is the one single steps give.
Once a request runs, its calls queue nothing (F = 0): the graph draws the
next character too, from the logits the call before ended with.

  - the graph returns the logits each character was drawn from; NumPy
    re-samples all K rows in one pass (sampling.sample_uncut, the server's
    sampler, in float64) and the stretch is kept only up to the first
    disagreement (the graph draws in float32: a random number within its
    rounding of a boundary may land on the other side). The session is left
    with the logits of the disputed character, which the ordinary sampler
    then draws (Request.numpy_draws);
  - every consumed generated character's input state goes to the request's
    undo window, as a step's would: undoing undelivered characters works
    unchanged;
  - stop strings and max_chars are checked on the kept characters; the
    session's state is the one after the last character kept.

All of a lone session's calls going to one graph also keeps one copy of the
weights warm in the caches (each ONNX Runtime session packs its own).

K is at most half the lookahead, so one stretch is written to the client
while the next is computed; after the first character, which NumPy draws and
sends at once, a request's calls take 4, 12, 48, then 64 characters at the
default lookahead of 128 (stretch_length: a steep ramp, because every call
costs the engine's Python ~0.4 ms besides the model).
A short prompt is consumed without sampling (K = 0): its first character is
drawn by the ordinary sampler and sent before anything else runs. A long one
is prefill's (prefill.py): its Loop runs no head or sampler per character
(through this Loop a 2,000-character prompt took 1.36x the raw ingestion
time on an H200, through prefill 1.01x).
"""

from __future__ import annotations

import time
from typing import NamedTuple, Sequence

import numpy as np

from server.engine.generation import (
    FINISHED_BY_REASON,
    LENGTH,
    STOP,
    RequestStatus,
    StreamEvent,
)
from server.engine.graphs.stretch_graph import (
    INPUT_FORCED,
    INPUT_STRETCH_LOGITS,
    INPUT_STRETCH_START,
    INPUT_TEMPERATURE,
    INPUT_UNIFORMS,
)
from server.engine.observer import StepObserver
from server.engine.runner.model_runner import ModelRunner
from server.engine.sampling import sample_uncut, uniforms_at
from server.engine.scheduling.prefill import PREFILL_MIN_CHARS
from server.engine.scheduling.slot_state import (
    Request,
    SlotState,
    own_window,
    prompt_progress,
)

# Most queued characters a Loop call consumes: longer queues (long prompts) are prefill's, whose graph
# has no head or sampler to run per character (prefill.py), or else single steps'.
FORCED_MAX = PREFILL_MIN_CHARS
# A stretch samples at most RAMP times the characters its request has generated. Each call costs
# ~0.4 ms of the engine's Python besides the model (a quarter of it checking the draws), so the
# ramp is steep: a doubling ramp made six calls of the first 126 characters, this one three of 64.
RAMP = 3


class LoopOutput(NamedTuple):
    forced_inputs: np.ndarray  # [F, L, H]: the state before each queued character
    tokens: np.ndarray  # [K] int64: the characters the graph sampled
    inputs: np.ndarray  # [K, L, H]: the state before consuming each
    drawn: np.ndarray  # [K, V]: the logits each was drawn from
    final_logits: np.ndarray  # [V] after the last character
    final: np.ndarray  # [L, H] after the last character


def stretch_length(request: Request, lookahead: int) -> int:
    """How many characters the request's next stretch may sample: within its lookahead room, no
    further than max_chars, at most RAMP times as many as it has generated (calls of 4, 12, 48
    characters: the first ones leave early), and with a generated character it consumes first, at
    most half the lookahead: then the call after this one has room as soon as the client took the
    characters of the call before, while this call's are still being written (a full lookahead per
    call would wait for every ack)."""
    generated = len(request.tokens)
    room = lookahead - (generated - request.delivered)
    unconsumed = generated - request.stepped  # sampled, consumed first by the same call
    return max(0, min(room, lookahead // 2 - unconsumed, request.spec.max_chars - generated,
                      max(1, RAMP * generated)))


def plan(state: SlotState, lookahead: int) -> tuple[list[int], int]:
    """(queued characters to consume, characters to sample after them) for a lone session's call.
    Sampling needs a request generating with a plain temperature whose queue holds at most a
    character NumPy sampled (a prompt's first character is drawn outside, and sent first; so is
    one the graph's draw disputed). With none queued the graph draws from the session's logits
    (the scheduler leaves them to it: Scheduler.sample)."""
    if len(state.pending) > FORCED_MAX:
        return [], 0
    forced = list(state.pending)
    request = state.request
    if request is None or not request.plain or request.status is not RequestStatus.GENERATING:
        return forced, 0
    return forced, stretch_length(request, lookahead)


def stretch_uniforms(state: SlotState, count: int) -> np.ndarray:
    """The session's next `count` random numbers: [K] float64."""
    return uniforms_at(np.full(count, state.key, np.uint64), state.position + np.arange(count, dtype=np.uint64))


def run_loop(runner: ModelRunner, slot: int, state: SlotState, forced: list[int], uniforms: np.ndarray,
             temperature: float) -> LoopOutput:
    """Consume `forced` and then sample and consume len(uniforms) characters, in one call."""
    assert runner.stretch_session is not None
    spec = runner.info.spec
    hidden = runner.read_states(np.array([slot]))[:, 0, :] if state.start is None else state.start  # [L, H]
    logits = state.logits if state.logits is not None and not forced else np.zeros(spec.vocab_size, np.float32)
    forced_inputs, tokens, inputs, drawn, final_logits, final = runner.stretch_session.run(None, {
        INPUT_FORCED: np.array(forced, np.int64)[:, None],  # [F, 1]
        INPUT_STRETCH_LOGITS: np.ascontiguousarray(logits[None, :], dtype=np.float32),  # [1, V]
        INPUT_STRETCH_START: np.ascontiguousarray(hidden[:, None, :], dtype=np.float32),  # [L, 1, H]
        INPUT_UNIFORMS: uniforms[:, None],  # [K, 1] float64
        INPUT_TEMPERATURE: np.array([temperature], np.float64),  # [1]
    })
    # [F, L, 1, H], [K, 1], [K, L, 1, H], [K, 1, V], [1, V], [L, 1, H]: the batch axis dropped. A Loop of
    # no iterations gives its scan outputs as [0] with every other axis 0 too: reshaped to their sizes.
    f, k, (layers, hidden_size), vocab = len(forced), len(uniforms), hidden.shape, len(logits)
    return LoopOutput(forced_inputs.reshape(f, layers, hidden_size), tokens.reshape(k), inputs.reshape(k, layers, hidden_size),
                      drawn.reshape(k, vocab), final_logits[0], final[:, 0, :])


def agreed_length(output: LoopOutput, uniforms: np.ndarray, temperature: float) -> int:
    """How many of the sampled characters, from the first, the server's NumPy sampler picks too."""
    disagree = sample_uncut(output.drawn, np.float64(temperature), uniforms) != output.tokens  # [K]
    first = int(disagree.argmax()) if len(disagree) else 0
    return first if len(disagree) and disagree[first] else len(disagree)


def agreed_lengths(tokens: np.ndarray, drawn: np.ndarray, uniforms: np.ndarray, temperature: np.ndarray) -> np.ndarray:
    """How many of each row's sampled characters, from the first, the server's NumPy sampler picks too:
    tokens [K, B], drawn [K, B, V], uniforms [K, B], temperature [B] -> [B]. One pass over all K x B draws."""
    k, b, v = drawn.shape
    # As one [K x B, V] batch: large batches take sample_uncut's column layout (the same tokens).
    redrawn = sample_uncut(drawn.reshape(k * b, v), np.broadcast_to(temperature, (k, b)).reshape(k * b),
                           uniforms.reshape(k * b)).reshape(k, b)  # [K, B]
    disagree = redrawn != tokens  # [K, B]
    return np.where(disagree.any(axis=0), disagree.argmax(axis=0), len(disagree))  # [B]


def take_forced(state: SlotState, output: LoopOutput, lookahead: int) -> None:
    """The queued characters were consumed, as ordinary steps would have: generated ones keep
    their input states for undoing, prompts move their request on."""
    request = state.request
    for k in range(len(output.forced_inputs)):
        state.pending.popleft()
        if request is not None and request.stepped < len(request.tokens):
            request.stepped += 1
            request.window[request.stepped] = output.forced_inputs[k]  # [L, H], a view of the call's output
            if request.stepped - request.delivered >= lookahead or request.status is not RequestStatus.GENERATING:
                own_window(request)  # as after a step: a stalled or finished request pins only its own rows
    if request is not None and request.status is not RequestStatus.GENERATING:
        prompt_progress(request, state)
    state.start = output.final  # the pool is not written: this state overrides it
    state.logits = None if state.pending else output.final_logits


def keep_stretch(request: Request, state: SlotState, output: LoopOutput, agreed: int, chars: Sequence[str],
                 lookahead: int, disputed: bool) -> StreamEvent | None:
    """Make the first `agreed` sampled characters the request's (fewer if one completes a stop
    string), as if each had been sampled and stepped singly; the session's state becomes the one
    after the last kept. `disputed`: NumPy drew character agreed + 1 otherwise (not merely a
    limit cut the stretch there), so NumPy draws it next. Returns their event (None when none
    is kept)."""
    tokens = output.tokens[:agreed].tolist()
    kept, matched = agreed, None
    if request.matcher.stops:
        for i, token in enumerate(tokens):
            matched = request.matcher.push(chars[token])
            if matched is not None:
                kept = i + 1
                break
    tokens = tokens[:kept]
    finish = keep_tokens(request, state, output, tokens, lookahead, numpy_draws=disputed and kept == agreed,
                         finish=STOP if matched is not None else None)
    if not tokens:
        return None
    return StreamEvent(text="".join([chars[token] for token in tokens]), finish=finish, matched_stop=matched or "")


def keep_tokens(request: Request, state: SlotState, output: LoopOutput, tokens: list[int], lookahead: int,
                numpy_draws: bool, finish: str | None = None) -> str | None:
    """Make `tokens`, the first of the characters the call drew, the request's, as if each had been
    sampled and stepped singly (no stop string is looked for: `finish` says if one ended them);
    the session's state becomes the one after the last. `numpy_draws`: the next character is
    NumPy's to draw. Returns the request's finish reason, None while it runs on."""
    kept = len(tokens)
    if kept < len(output.tokens):  # the state after the last kept character is the next one's input
        # Copies: views would keep the whole call's outputs alive while the session idles.
        state.start, state.logits = output.inputs[kept].copy(), output.drawn[kept].copy()
        request.numpy_draws = numpy_draws
    if kept == 0:
        return None
    generated = request.tokens
    assert request.stepped == len(generated), "a stretch starts with every generated character consumed"
    first = len(generated) + 1  # window[j] = the state before consuming generated char j (1-based)
    request.window.put_block(first, output.inputs[:kept])  # [kept, L, H], a view of the call's output
    generated.extend(tokens)
    request.stepped = len(generated)
    state.position += kept
    if finish is None and len(generated) >= request.spec.max_chars:
        finish = LENGTH
    if finish is not None:
        request.status = FINISHED_BY_REASON[finish]
    if request.stepped - request.delivered >= lookahead or finish is not None:
        own_window(request)
    return finish


def step_alone(runner: ModelRunner, slot: int, state: SlotState, lookahead: int, chars: Sequence[str],
               observer: StepObserver | None) -> tuple[bool, StreamEvent | None]:
    """The lone ready session's call: its queued characters and, when it may, a stretch. Returns
    (whether it ran, the event of the characters it kept); (False, None) when there are fewer than
    two characters to consume or sample (a step call costs less than a Loop call). Raises what the
    model call raised, the session untouched."""
    forced, count = plan(state, lookahead)
    if len(forced) + count < 2:
        return False, None
    request = state.request
    temperature = request.spec.settings.temperature if count and request is not None else 1.0
    uniforms = stretch_uniforms(state, count)  # [K]
    started = time.perf_counter()
    output = run_loop(runner, slot, state, forced, uniforms, temperature)
    if observer is not None:
        observer.observe_step(1, time.perf_counter() - started)
    take_forced(state, output, lookahead)
    if not count:
        return True, None
    assert request is not None
    agreed = agreed_length(output, uniforms, temperature)
    event = keep_stretch(request, state, output, agreed, chars, lookahead, disputed=agreed < count)
    if observer is not None:
        observer.observe_stretch(count, len(event.text) if event is not None else 0)
    return True, event
