"""The engine: batching never changes a session's text, an abort keeps exactly the delivered
characters, stop strings, draining, and surviving a failed step."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

from server.engine.generation import (
    LENGTH,
    SHUTDOWN,
    STOP,
    GenerationRequest,
    StreamEvent,
)
from server.engine.runner.model_runner import StepOutput, load_runner
from server.engine.runtime.loop import Engine
from server.engine.sampling import SamplingSettings
from tests.devices import SERVING_DEVICES
from tests.plain_loop import onnx_loop


@pytest.fixture(params=SERVING_DEVICES)
def engine(tiny_model_dir: Path, request: pytest.FixtureRequest) -> Iterator[Engine]:
    engine = Engine(load_runner(tiny_model_dir, device=request.param, num_slots=16), max_batch=4)
    engine.start()
    yield engine
    engine.stop()


async def collect(engine: Engine, slot: int, request: GenerationRequest) -> tuple[str, str]:
    """Deliver every character; return (text, finish reason)."""
    stream = engine.submit(slot, request)
    opening = await stream.opening()
    if opening.refused:
        assert opening.error is None, opening.error
        return "", opening.finish or ""
    text = []
    while True:
        chunk = await stream.next_chunk()
        text.append(chunk.text)
        if chunk.end is not None:
            assert chunk.end.error is None, chunk.end.error
            return "".join(text), chunk.end.finish or ""


def request(engine: Engine, prompt: str, n: int, seed: int | None = None, **settings: float) -> GenerationRequest:
    return GenerationRequest(tuple(engine.vocab.encode(prompt)), n, SamplingSettings(**settings), seed)


SETTINGS = [
    dict(temperature=0.0),
    dict(temperature=1.0),
    dict(temperature=0.7, top_k=5),
    dict(temperature=1.2, top_p=0.8),
    dict(temperature=0.9, top_k=8, top_p=0.95),
    dict(temperature=1.0),
]


def test_batched_text_equals_unbatched_text(engine: Engine, tiny_model_dir: Path) -> None:
    """Six sessions generating together (max_batch 4, so batches also rotate) == each alone."""
    prompts = ["To be", "Or not", "The sea", "W", "a", "fortune,"]

    async def together() -> list[str]:
        for slot in range(6):
            engine.open_slot(slot, seed=100 + slot, prompt_tokens=[])
        results = await asyncio.gather(
            *(collect(engine, slot, request(engine, prompts[slot], 150, **SETTINGS[slot])) for slot in range(6))
        )
        return [text for text, _ in results]

    async def alone() -> list[str]:
        texts = []
        for slot in range(6):
            engine.open_slot(10, seed=100 + slot, prompt_tokens=[])
            texts.append((await collect(engine, 10, request(engine, prompts[slot], 150, **SETTINGS[slot])))[0])
            engine.close_slot(10)
        return texts

    batched, single = asyncio.run(together()), asyncio.run(alone())
    assert batched == single
    assert batched == [onnx_loop(tiny_model_dir, prompt, 150, SamplingSettings(**settings), seed=100 + slot)
                       for slot, (prompt, settings) in enumerate(zip(prompts, SETTINGS))]


def test_an_aborted_stream_keeps_exactly_what_was_delivered(engine: Engine) -> None:
    """Generated ahead but never delivered, characters leave no trace: not in the state, their
    random numbers rewound. The continuation equals the uninterrupted text."""

    async def scenario() -> tuple[str, str, str, int]:
        engine.open_slot(0, seed=5, prompt_tokens=engine.vocab.encode("To be"))
        engine.open_slot(1, seed=5, prompt_tokens=engine.vocab.encode("To be"))
        reference, _ = await collect(engine, 0, request(engine, "", 200, temperature=1.0))
        stream = engine.submit(1, request(engine, "", 200, temperature=1.0))
        await stream.opening()
        delivered = ""
        while len(delivered) < 30:
            delivered += (await stream.next_chunk()).text
        await asyncio.sleep(0.2)  # the engine runs ahead of delivery meanwhile
        stream.abort()
        rest, _ = await collect(engine, 1, request(engine, "", 200 - len(delivered), temperature=1.0))
        return reference, delivered, rest, stream.consumed_chars

    reference, delivered, rest, consumed = asyncio.run(scenario())
    assert delivered == reference[: len(delivered)]
    assert delivered + rest == reference
    assert consumed == len("To be") + len(delivered)


def test_stop_string_is_delivered_consumed_and_ends_the_call(engine: Engine) -> None:
    async def scenario() -> tuple[str, tuple[str, str], str, str]:
        engine.open_slot(0, seed=9, prompt_tokens=engine.vocab.encode("Or "))
        reference, _ = await collect(engine, 0, request(engine, "", 120, temperature=1.0))
        stop = reference[40:43]
        engine.open_slot(1, seed=9, prompt_tokens=engine.vocab.encode("Or "))
        handle_request = GenerationRequest((), 120, SamplingSettings(temperature=1.0), None, (stop,))
        stopped = await collect(engine, 1, handle_request)
        after, _ = await collect(engine, 1, request(engine, "", 20, temperature=1.0))
        return reference, stopped, stop, after

    reference, (text, finish), stop, after = asyncio.run(scenario())
    end = reference.index(stop) + len(stop)
    assert finish == STOP and text == reference[:end]
    assert after == reference[end : end + 20]  # the stop text is part of the state


def test_drain_ends_generations_with_shutdown(engine: Engine) -> None:
    async def scenario() -> tuple[str, str]:
        engine.open_slot(0, seed=1, prompt_tokens=engine.vocab.encode("To"))
        stream = engine.submit(0, request(engine, "", 10_000, temperature=1.0))
        await stream.opening()
        received = 0
        while received < 5:
            received += len((await stream.next_chunk()).text)
        engine.drain()
        while (chunk := await stream.next_chunk()).end is None:
            pass
        engine.open_slot(1, seed=1, prompt_tokens=engine.vocab.encode("To"))
        late = await collect(engine, 1, request(engine, "", 10))
        return chunk.end.finish or "", late[1]

    assert asyncio.run(scenario()) == (SHUTDOWN, SHUTDOWN)


def test_a_failed_step_fails_its_generations_and_the_engine_goes_on(tiny_model_dir: Path) -> None:
    runner = load_runner(tiny_model_dir, device="cpu", num_slots=4)
    real_step, failures = runner.step, [1]

    def flaky_step(*args: np.ndarray | None) -> StepOutput:
        if failures:
            failures.pop()
            raise RuntimeError("simulated device error")
        return real_step(*args)

    runner.step = flaky_step  # type: ignore[method-assign]
    engine = Engine(runner, stretch=False)  # a lone session's calls would go through the Loop graph
    engine.start()

    async def first_end(slot: int) -> StreamEvent:
        stream = engine.submit(slot, request(engine, "To", 5))
        opening = await stream.opening()
        return opening if opening.refused else (await stream.next_chunk()).end  # type: ignore[return-value]

    async def scenario() -> tuple[list, tuple[str, str], tuple[str, str]]:
        engine.open_slot(0, seed=1, prompt_tokens=[])
        errors = [await first_end(0)]
        engine.open_slot(1, seed=1, prompt_tokens=[])
        other = await collect(engine, 1, request(engine, "To", 5))
        errors.append(await first_end(0))
        engine.reset_slot(0, seed=None, prompt_tokens=[])
        recovered = await collect(engine, 0, request(engine, "To", 5))
        return errors, other, recovered

    try:
        (failed, refused), (text, finish), recovered = asyncio.run(scenario())
    finally:
        engine.stop()
    assert failed.error is not None and "simulated device error" in failed.error and not failed.error_is_precondition
    assert text == onnx_loop(tiny_model_dir, "To", 5, SamplingSettings(), seed=1) and finish == LENGTH
    assert refused.error is not None and "reset" in refused.error and refused.error_is_precondition
    assert recovered == (text, LENGTH)  # after a reset the slot works again (same seed, same prompt)
