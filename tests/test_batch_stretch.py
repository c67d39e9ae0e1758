"""A batch's stretches: every ready session's characters sampled and consumed in one model call
(server/engine/scheduling/batch_stretch.py).

As for a lone stream's stretches (tests/test_stretch.py), they must be invisible:
each session's text is the one it gets alone with single steps (tests/plain_loop.py),
cancel and continue gives the uninterrupted text, a disagreement between the graph's
draw and NumPy's is redrawn, and a failed call fails only its requests. Every test
checks, through a recording wrapper around the graph, that calls for more than one
row really ran.
"""

from __future__ import annotations

import asyncio
import collections
import random
from pathlib import Path

import numpy as np
import pytest

from server.engine.generation import LENGTH, STOP, GenerationRequest, RequestStatus
from server.engine.graphs.stretch_graph import INPUT_UNIFORMS
from server.engine.runner.model_runner import ModelRunner, load_runner
from server.engine.runtime.loop import Engine
from server.engine.sampling import SamplingSettings
from server.engine.scheduling.batch_stretch import (
    DEFAULT_BATCH_STRETCH,
    agreed_lengths,
    keepable,
    plan_together,
)
from server.engine.scheduling.slot_state import Request, SlotState
from tests.devices import SERVING_DEVICES
from tests.plain_loop import onnx_loop
from tests.test_server_engine import collect, request
from tests.test_stretch import StretchCounts

PROMPTS = ["To be", "Or not", "The sea", "W", "a", "fortune,"]
# On a host-state runner a batch of plain requests stretches in the steady lane (lane_stretch.py);
# with states on a device, or without the lane's stretches, batch_stretch.py's per-row path does.
LANE_STRETCH = [pytest.param(True, id="lane"), pytest.param(False, id="per-row")]


class Recording:
    """The real stretch graph, noting the batch size of every call; `perturb` feeds the third row of
    every call of two rows or more another random number (as if the graph's float32 rounded otherwise);
    `fail_batch`: the first call of that many rows raises."""

    def __init__(self, runner: ModelRunner, perturb: bool = False, fail_batch: int = 0):
        assert runner.stretch_session is not None
        self.real, self.perturb, self.fail_batch = runner.stretch_session, perturb, fail_batch
        self.batches: list[int] = []
        self.sampled: list[int] = []  # K of every call of two rows or more
        runner.stretch_session = self  # type: ignore[assignment]

    def run(self, names, feeds):  # noqa: ANN001, ANN201 - as ort.InferenceSession.run
        uniforms = np.array(feeds[INPUT_UNIFORMS])  # [K, B]
        self.batches.append(uniforms.shape[1])
        if uniforms.shape[1] > 1:
            self.sampled.append(uniforms.shape[0])
        if self.fail_batch and uniforms.shape[1] == self.fail_batch:
            self.fail_batch = 0
            raise RuntimeError("simulated batch failure")
        if self.perturb and uniforms.shape[0] > 2 and uniforms.shape[1] > 1:
            uniforms[2, :] = (uniforms[2, :] + 0.5) % 1.0
        return self.real.run(names, {**feeds, INPUT_UNIFORMS: uniforms})

    @property
    def batched_calls(self) -> int:
        return sum(b > 1 for b in self.batches)


def start(tiny_model_dir: Path, device: str = "cpu", lookahead: int = 32, max_batch: int = 8,
          batch_stretch: int = DEFAULT_BATCH_STRETCH, lane_stretch: bool = True,
          **recording: bool | int) -> tuple[Engine, Recording, StretchCounts]:
    runner = load_runner(tiny_model_dir, device=device, num_slots=8)
    recorder = Recording(runner, **recording)  # type: ignore[arg-type]
    counts = StretchCounts()
    engine = Engine(runner, max_batch=max_batch, observer=counts, lookahead=lookahead, batch_stretch=batch_stretch,
                    lane_stretch=lane_stretch)
    engine.start()
    return engine, recorder, counts


def generate_together(engine: Engine, count: int, chars: int, temperature: float) -> list[tuple[str, str]]:
    """Sessions 0..count-1 (seeds 40, 41, ...) generate together from PROMPTS; (text, finish) each."""
    async def together() -> list[tuple[str, str]]:
        for slot in range(count):
            engine.open_slot(slot, seed=40 + slot, prompt_tokens=[])
        return await asyncio.gather(*(collect(engine, slot, request(engine, PROMPTS[slot], chars, temperature=temperature))
                                      for slot in range(count)))

    return asyncio.run(together())


def same_texts_together(tiny_model_dir: Path, count: int, chars: int, temperature: float,
                        **engine_args: bool | int | str) -> tuple[Recording, StretchCounts]:
    """Run generate_together on a fresh engine and check every text against the session's alone."""
    engine, recorder, counts = start(tiny_model_dir, **engine_args)  # type: ignore[arg-type]
    try:
        results = generate_together(engine, count, chars, temperature)
    finally:
        engine.stop()
    assert results == [(text, LENGTH) for text in references(tiny_model_dir, count, chars, temperature)]
    return recorder, counts


def references(tiny_model_dir: Path, count: int, chars: int, temperature: float, seed: int = 40) -> list[str]:
    return [onnx_loop(tiny_model_dir, PROMPTS[i], chars, SamplingSettings(temperature), seed=seed + i)
            for i in range(count)]


@pytest.mark.parametrize("lane_stretch", LANE_STRETCH)
@pytest.mark.parametrize("device", SERVING_DEVICES)
@pytest.mark.parametrize("lookahead", [8, 32])
def test_sessions_stretching_together_give_their_text_alone(tiny_model_dir: Path, device: str, lookahead: int,
                                                            lane_stretch: bool,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from server.engine.scheduling import lane_glue

    in_lane = []  # rows of each call the lane made
    real = lane_glue.stretch_lane

    def counting(runner: ModelRunner, lane: object, rows: np.ndarray, *args: object) -> object:
        call = real(runner, lane, rows, *args)  # type: ignore[arg-type]
        in_lane.extend([rows.size] if call is not None else [])
        return call

    monkeypatch.setattr(lane_glue, "stretch_lane", counting)
    recorder, counts = same_texts_together(tiny_model_dir, 6, 250, 0.9, device=device, lookahead=lookahead,
                                           lane_stretch=lane_stretch)
    # Which path made the batches' calls: the lane's on a host-state runner, else batch_stretch.py's.
    assert (max(in_lane, default=0) >= 2) == (lane_stretch and device == "cpu")
    assert recorder.batched_calls > 0 and counts.kept > 6 * 100 and counts.sampled == counts.kept  # none redrawn
    # Calls start small (a fresh request joined) and never sample more than the lookahead allows.
    assert recorder.sampled[0] == 2 and max(recorder.sampled) == min(DEFAULT_BATCH_STRETCH, lookahead // 2 - 1)


@pytest.mark.parametrize("most", [0, 1, 5])
def test_batch_stretch_bounds_what_a_call_samples(tiny_model_dir: Path, most: int) -> None:
    """--batch-stretch N: no call of two rows or more samples more than N characters per row; below 2, none runs."""
    recorder, _ = same_texts_together(tiny_model_dir, 3, 150, 0.9, batch_stretch=most)
    assert (max(recorder.sampled) == most) if most >= 2 else not recorder.sampled


@pytest.mark.parametrize("lane_stretch", LANE_STRETCH)
def test_more_sessions_than_max_batch_stretch_in_turns(tiny_model_dir: Path, lane_stretch: bool) -> None:
    """Six sessions, batches of at most four: calls take the least recently stepped, every session
    gets its text alone."""
    recorder, counts = same_texts_together(tiny_model_dir, 6, 200, 1.0, max_batch=4, lane_stretch=lane_stretch)
    assert recorder.batched_calls > 0 and max(recorder.batches) == 4 and counts.kept > 6 * 100


def test_an_idle_session_after_a_batch_holds_only_its_own_state(tiny_model_dir: Path) -> None:
    """What a session keeps once its request settled is its own [L, H] state and [V] logits, not views
    of the batch's call outputs (which would keep every row's arrays alive while it idles)."""
    engine, recorder, _ = start(tiny_model_dir)
    try:
        results = generate_together(engine, 4, 150, 1.0)
    finally:
        engine.stop()
    assert results == [(text, LENGTH) for text in references(tiny_model_dir, 4, 150, 1.0)]
    assert recorder.batched_calls > 0
    for slot in range(4):
        state = engine.scheduler.slots[slot]
        # Its state is in the pool (start None: its last step was an ordinary one, as can happen
        # when the machine is busy) or its own copy; its logits are its own.
        assert state.request is None and state.logits is not None
        for kept in (state.start, state.logits):  # copies, or views of a lone call's one-row outputs
            assert kept is None or kept.base is None or kept.base.size == kept.size


@pytest.mark.parametrize("lane_stretch", LANE_STRETCH)
def test_a_disagreement_in_a_batch_is_redrawn_for_its_row_only(tiny_model_dir: Path, lane_stretch: bool) -> None:
    recorder, counts = same_texts_together(tiny_model_dir, 4, 200, 1.0, perturb=True, lane_stretch=lane_stretch)
    assert recorder.batched_calls > 0 and counts.sampled > counts.kept > 0  # characters were discarded


@pytest.mark.parametrize("lane_stretch", LANE_STRETCH)
def test_cancel_and_continue_under_batch_stretches_gives_the_uninterrupted_text(tiny_model_dir: Path,
                                                                               lane_stretch: bool) -> None:
    """Sessions cancelled at random points while the others stretch on, then continued: each gets
    exactly its uninterrupted text, and its consumed count is its prompt plus what it was handed."""
    engine, recorder, _ = start(tiny_model_dir, lane_stretch=lane_stretch)
    rng = random.Random(7)
    cuts = [rng.choice([0, 1, 5, 17, 40, 90, 150]) for _ in range(6)]
    pauses = [rng.choice([0.0, 0.02]) for _ in range(6)]
    try:
        async def one(slot: int) -> tuple[str, int]:
            engine.open_slot(slot, seed=40 + slot, prompt_tokens=engine.vocab.encode(PROMPTS[slot]))
            stream = engine.submit(slot, request(engine, "", 250, temperature=1.0))
            await stream.opening()
            delivered = ""
            while len(delivered) < cuts[slot]:
                chunk = await stream.next_chunk()
                delivered += chunk.text
            await asyncio.sleep(pauses[slot])  # the others, and this one, run ahead meanwhile
            stream.abort()
            rest, _ = await collect(engine, slot, request(engine, "", 250 - len(delivered), temperature=1.0))
            return delivered + rest, stream.consumed_chars - len(PROMPTS[slot]) - len(delivered)

        async def all_six() -> list[tuple[str, int]]:
            return await asyncio.gather(*(one(slot) for slot in range(6)))

        results = asyncio.run(all_six())
    finally:
        engine.stop()
    assert [text for text, _ in results] == references(tiny_model_dir, 6, 250, 1.0)
    assert [extra for _, extra in results] == [0] * 6
    assert recorder.batched_calls > 0


def test_stops_and_max_chars_in_a_batch_end_where_single_steps_end(tiny_model_dir: Path) -> None:
    reference = references(tiny_model_dir, 3, 300, 1.0)
    stops = [text[100:103] for text in reference]
    ends = [text.index(stop) + len(stop) for text, stop in zip(reference, stops)]
    engine, recorder, _ = start(tiny_model_dir)
    try:
        async def together() -> list[tuple[str, str]]:
            for slot in range(3):
                engine.open_slot(slot, seed=40 + slot, prompt_tokens=[])
            stopped = [collect(engine, slot, GenerationRequest(tuple(engine.vocab.encode(PROMPTS[slot])), 300,
                                                               SamplingSettings(1.0), None, (stops[slot],)))
                       for slot in range(3)]
            return await asyncio.gather(*stopped, *(collect(engine, 3 + slot, request(engine, PROMPTS[slot], 77 + slot,
                                                                                       seed=40 + slot, temperature=1.0))
                                                   for slot in range(3)))

        for slot in range(3, 6):
            engine.open_slot(slot, seed=0, prompt_tokens=[])
        results = asyncio.run(together())
    finally:
        engine.stop()
    assert results[:3] == [(text[:end], STOP) for text, end in zip(reference, ends)]
    assert results[3:] == [(reference[slot][:77 + slot], LENGTH) for slot in range(3)]
    assert recorder.batched_calls > 0


@pytest.mark.parametrize("lane_stretch", LANE_STRETCH)
def test_a_failed_batch_call_fails_its_requests_and_the_engine_serves_on(tiny_model_dir: Path, lane_stretch: bool) -> None:
    engine, recorder, _ = start(tiny_model_dir, fail_batch=3, lane_stretch=lane_stretch)
    try:
        async def scenario() -> tuple[list[str | None], tuple[str, str]]:
            for slot in range(3):
                engine.open_slot(slot, seed=40 + slot, prompt_tokens=[])
            errors = []
            for slot, outcome in enumerate(await asyncio.gather(
                    *(run_to_end(engine, slot, request(engine, PROMPTS[slot], 200, temperature=1.0)) for slot in range(3)))):
                errors.append(outcome)
            engine.reset_slot(0, seed=40, prompt_tokens=[])  # a failed state must be reset
            again = await collect(engine, 0, request(engine, PROMPTS[0], 60, temperature=1.0))
            return errors, again

        errors, again = asyncio.run(scenario())
    finally:
        engine.stop()
    assert all(error is not None and "simulated batch failure" in error for error in errors)
    assert again == (references(tiny_model_dir, 1, 60, 1.0)[0], LENGTH)
    assert recorder.batches.count(3) >= 1  # the call that failed


async def run_to_end(engine: Engine, slot: int, spec: GenerationRequest) -> str | None:
    """Read a stream to its end; its error, or None."""
    stream = engine.submit(slot, spec)
    await stream.opening()
    while True:
        chunk = await stream.next_chunk()
        if chunk.end is not None:
            return chunk.end.error


def test_a_batch_with_a_request_that_cannot_stretch_takes_ordinary_steps(tiny_model_dir: Path) -> None:
    """A greedy or top-k request beside plain ones: no batched call while it runs, the same texts."""
    engine, recorder, _ = start(tiny_model_dir)
    try:
        async def together() -> list[tuple[str, str]]:
            for slot in range(3):
                engine.open_slot(slot, seed=40 + slot, prompt_tokens=[])
            return await asyncio.gather(
                collect(engine, 0, request(engine, PROMPTS[0], 120, temperature=1.0)),
                collect(engine, 1, request(engine, PROMPTS[1], 120, temperature=1.0)),
                collect(engine, 2, request(engine, PROMPTS[2], 400, temperature=0.8, top_k=5)))

        results = asyncio.run(together())
    finally:
        engine.stop()
    plain = references(tiny_model_dir, 2, 120, 1.0)
    assert results[:2] == [(text, LENGTH) for text in plain]
    assert results[2] == (onnx_loop(tiny_model_dir, PROMPTS[2], 400, SamplingSettings(0.8, top_k=5), seed=42), LENGTH)
    assert recorder.batched_calls == 0  # the top-k request outlived both plain ones


def test_keepable_and_agreed_lengths() -> None:
    def keep(generated: int, delivered: int, lookahead: int = 32, max_chars: int = 1000) -> int:
        spec = GenerationRequest((), max_chars, SamplingSettings(1.0))
        req = Request(1, 0, spec, None, None, 0, tokens=[0] * generated, delivered=delivered,  # type: ignore[arg-type]
                      stepped=generated - 1)
        return keepable(req, lookahead)

    assert keep(1, 0) == 15 and keep(100, 100) == 15  # no ramp: half the lookahead with the queued one
    assert keep(100, 80) == 12 and keep(100, 68) == 0 and keep(990, 990) == 10
    tokens = np.array([[1, 2], [3, 4], [5, 6]])  # [K, B]
    drawn = np.full((3, 2, 8), -50.0, np.float32)  # [K, B, V]: every draw is certain
    drawn[np.arange(3)[:, None], np.arange(2)[None, :], tokens] = 50.0
    uniforms = np.full((3, 2), 0.5)
    assert agreed_lengths(tokens, drawn, uniforms, np.ones(2)).tolist() == [3, 3]
    drawn[1, 1] = np.roll(drawn[1, 1], 1)  # row 1's second draw now picks 5, not 4
    assert agreed_lengths(tokens, drawn, uniforms, np.ones(2)).tolist() == [3, 1]


def test_a_batch_stretches_only_when_every_row_can() -> None:
    def row(pending: list[int], plain: bool = True, status: RequestStatus = RequestStatus.GENERATING,
            request: bool = True) -> tuple[int, SlotState]:
        spec = GenerationRequest((), 100, SamplingSettings(1.0))
        req = Request(1, 0, spec, status, None, 0, plain=plain, tokens=[0, 0, 0], stepped=2)  # type: ignore[arg-type]
        return 0, SlotState(key=1, pending=collections.deque(pending), request=req if request else None)

    assert plan_together([row([5]), row([6])], 32) == [15, 15]
    assert plan_together([row([5]), row([6, 7])], 32) is None  # a prompt queued behind it
    assert plan_together([row([5]), row([6], plain=False)], 32) is None  # greedy, top-k or top-p
    assert plan_together([row([5]), row([6], status=RequestStatus.CONSUMING_PROMPT)], 32) is None
    assert plan_together([row([5]), row([6], request=False)], 32) is None  # a session with no request
