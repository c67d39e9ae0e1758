"""Prefill: a run of known characters (a prompt) consumed in one Loop call gives exactly the state
of one step per character, and text generated after a prefilled prompt is exactly the plain loop's."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import onnx
import pytest

from server.engine.graphs.prefill_graph import PREFIX, build_prefill
from server.engine.model.model_dir import ModelDirError
from server.engine.runner.model_runner import load_runner
from server.engine.runtime.loop import Engine
from server.engine.sampling import SamplingSettings
from server.engine.scheduling import prefill as prefill_policy
from tests.conftest import TINY_TEXT
from tests.devices import SERVING_DEVICES
from tests.plain_loop import onnx_loop
from tests.test_server_engine import collect, request

LONG_PROMPT = TINY_TEXT * 3  # 516 characters: several chunks, and a tail shorter than a chunk


@pytest.mark.parametrize("device", SERVING_DEVICES)
def test_prefill_equals_single_steps_bit_for_bit(tiny_model_dir: Path, device: str) -> None:
    runner = load_runner(tiny_model_dir, device=device, num_slots=4)
    assert runner.prefill_session is not None
    spec = runner.info.spec
    rng = np.random.default_rng(3)
    tokens = rng.integers(0, spec.vocab_size, 150)
    start = rng.standard_normal((spec.num_layers, spec.hidden_size)).astype(np.float32)  # [L, H]
    # One step per character on slot 1, from `start`.
    runner.step(tokens[:1], np.array([1]), np.array([True]), start[:, None, :])
    for token in tokens[1:]:
        runner.step(np.array([token]), np.array([1]), np.array([False]))
    stepped = runner.read_states(np.array([1]))[:, 0, :]  # [L, H]
    assert np.array_equal(runner.prefill(tokens, start, slot=2), stepped)
    # From the slot's pooled state (start None), in two chunks; the pool itself is left alone.
    runner.step(tokens[:1], np.array([3]), np.array([True]), start[:, None, :])
    pooled_before = runner.read_states(np.array([3]))
    middle = runner.prefill(tokens[1:90], None, slot=3)
    assert np.array_equal(runner.read_states(np.array([3])), pooled_before)
    assert np.array_equal(runner.prefill(tokens[90:], middle, slot=3), stepped)


def test_a_model_already_using_the_prefix_is_refused(tiny_model_dir: Path) -> None:
    cell = onnx.load(str(tiny_model_dir / "model.onnx"))
    cell.graph.node[0].output[0] = PREFIX + "taken"
    with pytest.raises(ModelDirError, match="charstream_prefill"):
        build_prefill(cell, 2, 16)


def _count_prefills(engine: Engine) -> list[int]:
    calls: list[int] = []
    real = engine.scheduler.runner.prefill

    def counting(tokens: np.ndarray, *args: object) -> np.ndarray:
        calls.append(len(tokens))
        return real(tokens, *args)  # type: ignore[arg-type]

    engine.scheduler.runner.prefill = counting  # type: ignore[method-assign]
    return calls


@pytest.mark.parametrize("device", SERVING_DEVICES)
@pytest.mark.parametrize("settings", [dict(temperature=0.0), dict(temperature=0.9, top_k=8)])
def test_text_after_a_prefilled_prompt_is_exactly_the_plain_loops(tiny_model_dir: Path, device: str,
                                                                   settings: dict) -> None:
    engine = Engine(load_runner(tiny_model_dir, device=device, num_slots=4), max_batch=4)
    calls = _count_prefills(engine)
    engine.start()
    try:
        async def scenario() -> list[str]:
            engine.open_slot(0, seed=11, prompt_tokens=[])
            engine.open_slot(1, seed=12, prompt_tokens=[])
            # Two long prompts at once (both prefilled), then one alone.
            together = await asyncio.gather(collect(engine, 0, request(engine, LONG_PROMPT, 120, **settings)),
                                            collect(engine, 1, request(engine, LONG_PROMPT[7:], 120, **settings)))
            alone = await collect(engine, 0, request(engine, LONG_PROMPT, 80, **settings))
            return [text for text, _ in together] + [alone[0]]

        texts = asyncio.run(scenario())
    finally:
        engine.stop()
    sampling = SamplingSettings(**settings)
    first = onnx_loop(tiny_model_dir, LONG_PROMPT, 120, sampling, seed=11)
    assert texts[0] == first
    assert texts[1] == onnx_loop(tiny_model_dir, LONG_PROMPT[7:], 120, sampling, seed=12)
    if sampling.greedy:  # the third call continues session 0: its prompt follows the first call's text
        assert texts[2] == onnx_loop(tiny_model_dir, LONG_PROMPT + first + LONG_PROMPT, 80, sampling)
    assert calls and max(calls) == prefill_policy.PREFILL_CHUNK
    assert sum(calls) >= 3 * (len(LONG_PROMPT) - 1 - prefill_policy.PREFILL_CHUNK)


def test_a_failed_prefill_fails_only_its_request(tiny_model_dir: Path) -> None:
    # Without stretches, so that the other (short) prompt takes the ordinary steps recorded below.
    engine = Engine(load_runner(tiny_model_dir, device="cpu", num_slots=4), max_batch=4, stretch=False)

    def failing(*args: object) -> np.ndarray:
        raise RuntimeError("simulated prefill failure")

    runner = engine.scheduler.runner
    runner.prefill = failing  # type: ignore[method-assign]
    real_step, step_sizes = runner.step, []

    def recording_step(tokens: np.ndarray, *args: object) -> object:
        step_sizes.append(len(tokens))
        return real_step(tokens, *args)  # type: ignore[arg-type]

    runner.step = recording_step  # type: ignore[method-assign]
    engine.start()
    try:
        async def scenario() -> tuple[str, str]:
            engine.open_slot(0, seed=1, prompt_tokens=[])
            engine.open_slot(1, seed=2, prompt_tokens=[])
            stream = engine.submit(0, request(engine, LONG_PROMPT, 10))
            await stream.opening()
            end = (await stream.next_chunk()).end
            assert end is not None and end.error is not None and "simulated prefill failure" in end.error
            other, _ = await collect(engine, 1, request(engine, "To be", 30))  # short: no prefill
            return end.error, other

        _, other = asyncio.run(scenario())
    finally:
        engine.stop()
    assert other == onnx_loop(tiny_model_dir, "To be", 30, SamplingSettings(), seed=2)
    assert step_sizes and 0 not in step_sizes  # the failed slot left no step of zero rows behind
