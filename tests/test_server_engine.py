"""The engine: batching never changes a session's text, cancellation drops only the
undelivered character, stop strings, draining, and surviving a failed step."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

from server.engine import Engine
from server.generation import LENGTH, SHUTDOWN, STOP, GenerationRequest
from server.model_runner import load_runner
from server.sampling import SamplingSettings


@pytest.fixture()
def engine(tiny_model_dir: Path) -> Iterator[Engine]:
    engine = Engine(load_runner(tiny_model_dir, device="cpu", num_slots=16), max_batch=4)
    engine.start()
    yield engine
    engine.stop()


async def collect(engine: Engine, slot: int, request: GenerationRequest) -> tuple[str, str]:
    """Deliver every character (ack each); return (text, finish reason)."""
    handle = engine.generate(slot, request, asyncio.get_running_loop())
    text = []
    while True:
        event = await handle.next_event()
        assert event.error is None, event.error
        if event.text:
            text.append(event.text)
            handle.ack()
        if event.finish is not None:
            return "".join(text), event.finish


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


def test_batched_text_equals_unbatched_text(engine: Engine) -> None:
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
    assert all(len(text) == 150 for text in batched)
    assert batched == single


def test_cancel_drops_only_the_undelivered_character(engine: Engine) -> None:
    """Cancelled before delivery, a character leaves no trace: not in the state, its random number returned."""

    async def scenario() -> tuple[str, str, str]:
        engine.open_slot(0, seed=5, prompt_tokens=engine.vocab.encode("To be"))
        engine.open_slot(1, seed=5, prompt_tokens=engine.vocab.encode("To be"))
        reference, _ = await collect(engine, 0, request(engine, "", 80, temperature=1.0))
        handle = engine.generate(1, request(engine, "", 80, temperature=1.0), asyncio.get_running_loop())
        delivered = []
        while len(delivered) < 30:
            event = await handle.next_event()
            delivered.append(event.text)
            handle.ack()
        undelivered = (await handle.next_event()).text  # sampled, never acknowledged
        handle.cancel()
        rest, _ = await collect(engine, 1, request(engine, "", 50, temperature=1.0))
        return reference, "".join(delivered), undelivered + "|" + rest

    reference, delivered, tail = asyncio.run(scenario())
    undelivered, rest = tail.split("|", 1)
    assert delivered == reference[:30]
    assert undelivered == reference[30]
    assert delivered + rest == reference  # continuing resamples the dropped character identically


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
        handle = engine.generate(0, request(engine, "", 10_000, temperature=1.0), asyncio.get_running_loop())
        for _ in range(5):
            await handle.next_event()
            handle.ack()
        engine.drain()
        while True:
            event = await handle.next_event()
            if event.text:
                handle.ack()
            if event.finish is not None:
                break
        engine.open_slot(1, seed=1, prompt_tokens=engine.vocab.encode("To"))
        late = await collect(engine, 1, request(engine, "", 10))
        return event.finish, late[1]

    assert asyncio.run(scenario()) == (SHUTDOWN, SHUTDOWN)


def test_a_failed_step_fails_its_generations_and_the_engine_goes_on(tiny_model_dir: Path) -> None:
    runner = load_runner(tiny_model_dir, device="cpu", num_slots=4)
    real_step, failures = runner.step, [1]

    def flaky_step(tokens: np.ndarray, slots: np.ndarray, fresh: np.ndarray) -> np.ndarray:
        if failures:
            failures.pop()
            raise RuntimeError("simulated device error")
        return real_step(tokens, slots, fresh)

    runner.step = flaky_step  # type: ignore[method-assign]
    engine = Engine(runner)
    engine.start()

    async def scenario() -> tuple[list, tuple[str, str], tuple[str, str]]:
        loop = asyncio.get_running_loop()
        engine.open_slot(0, seed=1, prompt_tokens=[])
        errors = [await engine.generate(0, request(engine, "To", 5), loop).next_event()]
        engine.open_slot(1, seed=1, prompt_tokens=[])
        other = await collect(engine, 1, request(engine, "To", 5))
        errors.append(await engine.generate(0, request(engine, "To", 5), loop).next_event())
        engine.reset_slot(0, seed=None, prompt_tokens=[])
        recovered = await collect(engine, 0, request(engine, "To", 5))
        return errors, other, recovered

    try:
        (failed, refused), (text, finish), recovered = asyncio.run(scenario())
    finally:
        engine.stop()
    assert failed.error is not None and "simulated device error" in failed.error and not failed.error_is_precondition
    assert len(text) == 5 and finish == LENGTH
    assert refused.error is not None and "reset" in refused.error and refused.error_is_precondition
    assert recovered == (text, LENGTH)  # after a reset the slot works again (same seed, same prompt)
