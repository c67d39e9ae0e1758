"""Stretches: a lone stream's characters sampled and consumed in one model call (server/engine/scheduling/stretch.py).

A stretch must be invisible: the same text as single steps (tests/plain_loop.py),
the same states bit for bit, exact undo of what was never delivered, stop
strings and max_chars where single steps put them, and a disagreement between
the graph's sampler and NumPy's redrawn by NumPy. Each test also checks that
stretches really ran (the observer counts their characters), so none of them
passes by falling back to single steps.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Iterator

import numpy as np
import onnxruntime as ort
import pytest

from server.engine.generation import (
    LENGTH,
    STOP,
    GenerationRequest,
    RequestStatus,
    StopMatcher,
)
from server.engine.graphs.stretch_graph import INPUT_FORCED, INPUT_UNIFORMS
from server.engine.runner.model_runner import ModelRunner, load_runner
from server.engine.runtime.loop import Engine
from server.engine.sampling import SamplingSettings, sample_uncut, stream_key
from server.engine.scheduling.slot_state import Request, SlotSnapshot, SlotState
from server.engine.scheduling.stretch import (
    LoopOutput,
    agreed_length,
    keep_stretch,
    run_loop,
    stretch_length,
    stretch_uniforms,
)
from tests.devices import SERVING_DEVICES
from tests.plain_loop import onnx_loop, plain_step
from tests.test_server_engine import collect, request


class StretchCounts:
    """A StepObserver that counts the characters stretches sampled and kept."""

    def __init__(self) -> None:
        self.sampled = self.kept = self.stretches = 0
        self.most_ahead = 0  # the largest charstream_most_undelivered_chars reported
        self.calls: list[tuple[int, int]] = []  # (sampled, kept) of every stretch, in order

    def observe_step(self, batch_size: int, seconds: float) -> None:
        pass

    def observe_lookahead(self, total: int, most: int) -> None:
        self.most_ahead = max(self.most_ahead, most)

    def observe_prefix_cache(self, hit: bool, skipped_chars: int, cache: object) -> None:
        pass

    def observe_stretch(self, sampled: int, kept: int) -> None:
        self.stretches += 1
        self.sampled += sampled
        self.kept += kept
        self.calls.append((sampled, kept))


def start_engine(runner: ModelRunner, lookahead: int = 32, stretch: bool = True) -> tuple[Engine, StretchCounts]:
    counts = StretchCounts()
    engine = Engine(runner, max_batch=4, observer=counts, lookahead=lookahead, stretch=stretch)
    engine.start()
    return engine, counts


@pytest.fixture(params=SERVING_DEVICES)
def device(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def engine(tiny_model_dir: Path, device: str) -> Iterator[tuple[Engine, StretchCounts]]:
    engine, counts = start_engine(load_runner(tiny_model_dir, device=device, num_slots=8))
    yield engine, counts
    engine.stop()


def test_a_loop_call_equals_single_steps_bit_for_bit(tiny_model_dir: Path, device: str) -> None:
    """Queued characters, then sampled ones: the graph's characters are the NumPy sampler's, and every
    state and logits it returns are the single steps'."""
    runner = load_runner(tiny_model_dir, device=device, num_slots=2)
    assert runner.stretch_session is not None
    spec = runner.info.spec
    zeros = np.zeros((spec.num_layers, spec.hidden_size), np.float32)
    forced = [3, 1, 4, 1, 5]
    state = SlotState(key=stream_key(11), start=zeros)
    uniforms = stretch_uniforms(state, 24)  # [K]
    output = run_loop(runner, 0, state, forced, uniforms, 0.8)
    assert np.array_equal(output.tokens, sample_uncut(output.drawn, np.full(24, 0.8), uniforms))
    assert agreed_length(output, uniforms, 0.8) == 24
    first = True
    for k, token in enumerate(forced + output.tokens.tolist()):  # the same characters, stepped singly
        before = runner.read_states(np.array([0]))[:, 0, :] if not first else zeros
        if k < len(forced):
            assert np.array_equal(output.forced_inputs[k], before)
        else:
            assert np.array_equal(output.inputs[k - len(forced)], before)
            assert np.array_equal(output.drawn[k - len(forced)], logits)
        logits = runner.step(np.array([token]), np.array([0]), np.array([first]), zeros[:, None, :]).logits[0]
        first = False
    assert np.array_equal(output.final_logits, logits)
    assert np.array_equal(output.final, runner.read_states(np.array([0]))[:, 0, :])


@pytest.mark.parametrize("lookahead", [4, 32])
def test_a_lone_stream_gives_the_plain_loops_text(tiny_model_dir: Path, device: str, lookahead: int) -> None:
    engine, counts = start_engine(load_runner(tiny_model_dir, device=device, num_slots=4), lookahead=lookahead)
    try:
        engine.open_slot(0, seed=21, prompt_tokens=[])
        text, finish = asyncio.run(collect(engine, 0, request(engine, "To be", 300, temperature=0.7)))
    finally:
        engine.stop()
    assert (text, finish) == (onnx_loop(tiny_model_dir, "To be", 300, SamplingSettings(0.7), seed=21), LENGTH)
    # Each call consumes the character drawn by NumPy and samples the rest of half the lookahead.
    half = lookahead // 2
    assert counts.kept > 0.8 * 300 * (half - 1) / half and counts.sampled == counts.kept  # none redrawn


def test_state_after_a_stretched_generation_equals_single_steps(tiny_model_dir: Path) -> None:
    """Snapshots (hidden state, logits, random position) with stretches and without are identical."""
    snapshots, counts = [], []
    for stretch in (True, False):
        engine, count = start_engine(load_runner(tiny_model_dir, device="cpu", num_slots=4), stretch=stretch)
        try:
            engine.open_slot(0, seed=3, prompt_tokens=[])
            asyncio.run(collect(engine, 0, request(engine, "To be", 97, temperature=1.1)))

            async def snapshot():  # noqa: ANN202
                return await engine.snapshot(0)

            snapshots.append(asyncio.run(snapshot()))
            counts.append(count.kept)
        finally:
            engine.stop()
    with_stretch, without = snapshots
    assert counts[0] > 80 and counts[1] == 0
    assert np.array_equal(with_stretch.hidden, without.hidden)
    assert np.array_equal(with_stretch.logits, without.logits)
    assert (with_stretch.position, with_stretch.consumed_chars, with_stretch.recent_text) == (
        without.position, without.consumed_chars, without.recent_text)


def generate_through(runner: ModelRunner, stretch_session: object, seed: int, chars: int,
                     temperature: float) -> tuple[str, StretchCounts]:
    """`chars` characters after "The" from a fresh session, the runner's stretch graph replaced by
    `stretch_session` (a wrapper of the real one); within 60 s (a draw retried for ever never ends)."""
    runner.stretch_session = stretch_session  # type: ignore[assignment]
    engine, counts = start_engine(runner)
    try:
        engine.open_slot(0, seed=seed, prompt_tokens=[])
        generation = collect(engine, 0, request(engine, "The", chars, temperature=temperature))
        text, _ = asyncio.run(asyncio.wait_for(generation, 60))
    finally:
        engine.stop()
    return text, counts


def test_a_disagreement_is_redrawn_by_the_numpy_sampler(tiny_model_dir: Path) -> None:
    """A stretch whose graph picked another character than NumPy would keep only what came before;
    the disputed character is drawn again, and the text stays the plain loop's."""
    runner = load_runner(tiny_model_dir, device="cpu", num_slots=4)
    real = runner.stretch_session
    assert real is not None

    class Corrupting:
        """The real graph, fed another random number for the third character of every stretch (as
        if its Exp rounded otherwise): from there on it samples, and steps, another path."""

        def run(self, names, feeds):  # noqa: ANN001, ANN202
            uniforms = np.array(feeds[INPUT_UNIFORMS])
            if len(uniforms) > 2:
                uniforms[2] = (uniforms[2] + 0.5) % 1.0
            return real.run(names, {**feeds, INPUT_UNIFORMS: uniforms})

    text, counts = generate_through(runner, Corrupting(), seed=8, chars=200, temperature=0.9)
    assert text == onnx_loop(tiny_model_dir, "The", 200, SamplingSettings(0.9), seed=8)
    assert counts.sampled > counts.kept > 0  # stretches ran, and characters were discarded


def test_the_graph_draws_a_running_requests_next_character_and_numpy_a_disputed_one(tiny_model_dir: Path) -> None:
    """Once a request runs, its calls queue nothing: the graph draws the next character from the
    logits the call before ended with. When that very first draw is disputed (nothing kept),
    NumPy draws the character, the next call consumes it, and the text stays the plain loop's;
    undisputed, the call keeps all it drew."""
    runner = load_runner(tiny_model_dir, device="cpu", num_slots=4)
    real = runner.stretch_session
    assert real is not None
    calls: list[tuple[int, int, bool]] = []  # (characters queued, sampled, first draw disputed) of every call

    class DisputingFirstDraws:
        """The real graph, fed another random number for the first draw of the calls that queue
        nothing and whose first random number is below 0.5: the graph's first character is then
        (almost always) not NumPy's, and would be again in a retry of the same call (same number)."""

        def run(self, names, feeds):  # noqa: ANN001, ANN202
            uniforms = np.array(feeds[INPUT_UNIFORMS])
            disputing = len(feeds[INPUT_FORCED]) == 0 and len(uniforms) > 0 and uniforms[0] < 0.5
            calls.append((len(feeds[INPUT_FORCED]), len(uniforms), disputing))
            if disputing:
                uniforms[0] = (uniforms[0] + 0.5) % 1.0
            return real.run(names, {**feeds, INPUT_UNIFORMS: uniforms})

    text, counts = generate_through(runner, DisputingFirstDraws(), seed=3, chars=300, temperature=1.1)
    assert text == onnx_loop(tiny_model_dir, "The", 300, SamplingSettings(1.1), seed=3)
    sampling = [(queued, disputing) for queued, sampled, disputing in calls if sampled]
    assert len(sampling) == len(counts.calls)  # one stretch observed per sampling call, in order
    drawing = [(disputing, kept, sampled) for (queued, disputing), (sampled, kept) in zip(sampling, counts.calls)
               if queued == 0]
    assert sum(1 for disputing, _, _ in drawing if disputing) >= 2
    assert sum(1 for disputing, _, _ in drawing if not disputing) >= 2
    # An undisputed call that drew its first character keeps all it drew; a disputed one keeps none.
    assert all(kept == (0 if disputing else sampled) for disputing, kept, sampled in drawing), drawing


def same_state(cell: ort.InferenceSession, one: SlotSnapshot, other: SlotSnapshot) -> bool:
    """Whether two snapshots hold the same model state: bit for bit when both hold the same queue;
    else (one may hold the last delivered character queued, the other consumed) after single steps
    of the queued characters on the CPU, within fp32 rounding of another device's step."""
    if one.pending == other.pending:
        logits_equal = (one.logits is None and other.logits is None) or (
            one.logits is not None and other.logits is not None and np.array_equal(one.logits, other.logits))
        return bool(np.array_equal(one.hidden, other.hidden)) and logits_equal
    consumed = []
    for snapshot in (one, other):
        hidden, logits = snapshot.hidden[:, None, :], snapshot.logits  # [L, 1, H], [V]
        for token in snapshot.pending:
            logits, hidden = plain_step(cell, token, hidden)
        consumed.append((hidden, logits))
    (h1, l1), (h2, l2) = consumed
    return bool(np.allclose(h1, h2, rtol=0, atol=1e-5) and np.allclose(l1, l2, rtol=0, atol=1e-4))


def test_cancel_and_continue_a_lone_stream_gives_the_uninterrupted_text(engine: tuple[Engine, StretchCounts],
                                                                        tiny_model_dir: Path) -> None:
    """Stretches run up to the lookahead ahead; whatever was never taken is undone exactly: at once
    (the undo window still views of the Loop's outputs) or after a pause (the request stalled at its
    lookahead and copied its window), from nothing delivered (m = 0) on. A snapshot taken while the
    stream runs already holds the state the abort leaves."""
    engine_, counts = engine
    reference = onnx_loop(tiny_model_dir, "To be", 400, SamplingSettings(1.0), seed=5)
    cell = ort.InferenceSession(str(tiny_model_dir / "model.onnx"), providers=["CPUExecutionProvider"])

    async def cancel_after(at_least: int, pause: float) -> tuple[str, str, int, str, SlotSnapshot, SlotSnapshot]:
        engine_.open_slot(1, seed=5, prompt_tokens=engine_.vocab.encode("To be"))
        stream = engine_.submit(1, request(engine_, "", 400, temperature=1.0))
        await stream.opening()
        delivered = ""
        while len(delivered) < at_least:
            delivered += (await stream.next_chunk()).text
        await asyncio.sleep(pause)  # the engine runs ahead of delivery meanwhile
        running = await engine_.snapshot(1)
        stream.abort()
        settled = await engine_.snapshot(1)
        rest, _ = await collect(engine_, 1, request(engine_, "", 400 - len(delivered), temperature=1.0))
        return delivered, rest, stream.consumed_chars, stream.recent_text, running, settled

    for at_least, pause in ((0, 0.0), (1, 0.0), (7, 0.05), (40, 0.0), (150, 0.05)):
        delivered, rest, consumed, recent, running, settled = asyncio.run(cancel_after(at_least, pause))
        assert delivered + rest == reference
        assert consumed == len("To be") + len(delivered) and recent == ("To be" + delivered)[-256:]
        assert same_state(cell, running, settled)
        assert (running.position, running.consumed_chars, running.recent_text) == (
            settled.position, settled.consumed_chars, settled.recent_text)
    assert counts.kept > 0


def test_a_stalled_lone_stream_runs_exactly_its_lookahead_ahead(tiny_model_dir: Path) -> None:
    """Stretches never take a stream past its lookahead, and the gauge sees how far they went."""
    engine, counts = start_engine(load_runner(tiny_model_dir, device="cpu", num_slots=2), lookahead=20)
    try:
        async def stall() -> tuple[int, str]:
            engine.open_slot(0, seed=4, prompt_tokens=[])
            stream = engine.submit(0, request(engine, "To be", 300, temperature=1.0))
            await stream.opening()
            await asyncio.sleep(0.2)  # nobody reads: the engine runs ahead, then waits
            chunk = await stream.next_chunk()
            stream.abort()
            return counts.most_ahead, chunk.text

        most, text = asyncio.run(stall())
    finally:
        engine.stop()
    assert most == 20 and len(text) == 20 and counts.kept > 0
    assert text == onnx_loop(tiny_model_dir, "To be", 20, SamplingSettings(1.0), seed=4)


def test_stops_and_max_chars_end_where_single_steps_end(engine: tuple[Engine, StretchCounts],
                                                        tiny_model_dir: Path) -> None:
    engine_, counts = engine
    reference = onnx_loop(tiny_model_dir, "Or ", 300, SamplingSettings(1.0), seed=9)
    stop = reference[150:153]
    end = reference.index(stop) + len(stop)

    async def scenario() -> tuple[tuple[str, str], str, tuple[str, str]]:
        engine_.open_slot(0, seed=9, prompt_tokens=engine_.vocab.encode("Or "))
        stopped = await collect(engine_, 0, GenerationRequest((), 300, SamplingSettings(1.0), None, (stop,)))
        after, _ = await collect(engine_, 0, request(engine_, "", 37, temperature=1.0))
        limited = await collect(engine_, 0, request(engine_, "", 300 - end - 37, temperature=1.0))
        return stopped, after, limited

    (text, finish), after, (limited, limited_finish) = asyncio.run(scenario())
    assert (text, finish) == (reference[:end], STOP)
    assert after == reference[end:end + 37]  # the stop text is in the state; what followed it is not
    assert (limited, limited_finish) == (reference[end + 37:], LENGTH)
    assert counts.kept > 100


def test_only_a_disputed_draw_is_left_to_numpy() -> None:
    """A stretch kept up to a disagreement leaves the next character to NumPy; one cut at a limit
    (a batch row's lookahead room) leaves it to the next call's graph."""
    layers, hidden, vocab, count = 1, 4, 5, 6
    output = LoopOutput(np.zeros((0, layers, hidden), np.float32), np.arange(count) % vocab,
                        np.zeros((count, layers, hidden), np.float32), np.ones((count, vocab), np.float32),
                        np.zeros(vocab, np.float32), np.zeros((layers, hidden), np.float32))
    for disputed in (True, False):
        spec = GenerationRequest((), 100, SamplingSettings(1.0))
        req = Request(1, 0, spec, RequestStatus.GENERATING, StopMatcher(()), 0, plain=True, tokens=[0], stepped=1)
        state = SlotState(key=1)
        event = keep_stretch(req, state, output, 3, "abcde", 32, disputed=disputed)
        assert event is not None and event.text == "abc" and req.tokens == [0, 0, 1, 2]
        assert req.numpy_draws is disputed
        assert np.array_equal(state.logits, output.drawn[3])  # the fourth character's logits, drawn next


def test_stretch_length_ramps_and_stays_within_bounds() -> None:
    def length(generated: int, delivered: int, lookahead: int = 32, max_chars: int = 1000, queued: int = 1) -> int:
        """With the last `queued` generated characters sampled by NumPy and queued (a call consumes them first)."""
        spec = GenerationRequest((), max_chars, SamplingSettings(1.0))
        req = Request(1, 0, spec, None, None, 0, tokens=[0] * generated, delivered=delivered,  # type: ignore[arg-type]
                      stepped=max(0, generated - queued))
        return stretch_length(req, lookahead)

    # The ramp (RAMP = 3 times what was generated); then a call (the queued character and the
    # stretch) is at most half the lookahead; with nothing queued the graph draws all of it.
    assert [length(g, 0) for g in (0, 1, 2, 4, 8)] == [1, 3, 6, 12, 15]
    assert [length(g, g) for g in (16, 64)] == [15, 15]
    assert [length(g, g, queued=0) for g in (4, 16, 64)] == [12, 16, 16]
    assert length(100, 90) == 15 and length(100, 80) == 12 and length(100, 68) == 0  # room left in the lookahead
    assert length(990, 990) == 10  # no further than max_chars
    assert length(40, 40, lookahead=1) == 0  # a lookahead of one leaves single steps


def test_a_failed_loop_call_fails_its_request_and_the_engine_serves_on(tiny_model_dir: Path) -> None:
    """As a failed step: the request fails, the session must be reset, the engine serves on."""
    runner = load_runner(tiny_model_dir, device="cpu", num_slots=4)
    real, calls = runner.stretch_session, []
    assert real is not None

    class FailingOnce:
        """Fails the third call: after the prompt's and a first stretch, one consuming a generated
        character and sampling more."""

        def run(self, names, feeds):  # noqa: ANN001, ANN202
            calls.append(len(feeds[INPUT_UNIFORMS]))
            if len(calls) == 3:
                raise RuntimeError("simulated loop failure")
            return real.run(names, feeds)

    runner.stretch_session = FailingOnce()  # type: ignore[assignment]
    engine, counts = start_engine(runner)
    try:
        async def scenario() -> tuple[str | None, tuple[str, str], tuple[str, str]]:
            engine.open_slot(0, seed=1, prompt_tokens=[])
            stream = engine.submit(0, request(engine, "To be", 50, temperature=1.0))
            await stream.opening()
            while (chunk := await stream.next_chunk()).end is None:
                pass
            end = chunk.end
            engine.open_slot(1, seed=2, prompt_tokens=[])
            other = await collect(engine, 1, request(engine, "To be", 50, temperature=1.0))
            engine.reset_slot(0, seed=1, prompt_tokens=[])
            again = await collect(engine, 0, request(engine, "To be", 50, temperature=1.0))
            return (end.error if end is not None else None), other, again

        error, other, again = asyncio.run(scenario())
    finally:
        engine.stop()
    assert error is not None and "simulated loop failure" in error and calls[2] > 0  # it was sampling
    assert other == (onnx_loop(tiny_model_dir, "To be", 50, SamplingSettings(1.0), seed=2), LENGTH)
    assert again == (onnx_loop(tiny_model_dir, "To be", 50, SamplingSettings(1.0), seed=1), LENGTH)
    assert counts.kept > 0


def test_the_graph_builds_for_newer_opsets(tiny_model_dir: Path) -> None:
    """Several operators changed their signatures in opset 18 (reductions take their axes as an
    input): the graph of a cell converted to 18 gives exactly the outputs of the opset-17 one."""
    import onnx
    from onnx import version_converter

    from server.engine.graphs.stretch_graph import (
        INPUT_STRETCH_LOGITS,
        INPUT_STRETCH_START,
        INPUT_TEMPERATURE,
        build_stretch,
    )

    cell = onnx.load(str(tiny_model_dir / "model.onnx"))
    spec = load_runner(tiny_model_dir, device="cpu", num_slots=1).info.spec
    sizes = (spec.num_layers, spec.hidden_size, spec.vocab_size)
    feeds = {INPUT_FORCED: np.array([[3], [4]], np.int64), INPUT_STRETCH_LOGITS: np.zeros((1, spec.vocab_size), np.float32),
             INPUT_STRETCH_START: np.zeros((spec.num_layers, 1, spec.hidden_size), np.float32),
             INPUT_UNIFORMS: np.linspace(0.01, 0.99, 20)[:, None], INPUT_TEMPERATURE: np.array([0.8])}
    outputs = []
    for model in (cell, version_converter.convert_version(cell, 18)):
        graph = build_stretch(model, *sizes)
        session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
        outputs.append(session.run(None, feeds))
    assert max(o.version for o in version_converter.convert_version(cell, 18).opset_import) == 18
    assert all(np.array_equal(a, b) for a, b in zip(*outputs))
