"""The scheduler, driven step by step on this thread: generation runs ahead of delivery by at
most the lookahead, and an abort undoes exactly the characters never delivered (state and
random stream), whatever the point, the settings and the other sessions in the batch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from server.engine.generation import LENGTH, GenerationRequest, RequestStatus
from server.engine.runner.model_runner import load_runner
from server.engine.sampling import SamplingSettings
from server.engine.scheduling.scheduler import Scheduler
from tests.plain_loop import onnx_loop

PROMPT = "To be, or"
LENGTH_CHARS = 60
SETTINGS = {
    "greedy": SamplingSettings(temperature=0.0),
    "sampled": SamplingSettings(temperature=1.0),
    "top-k/top-p": SamplingSettings(temperature=0.9, top_k=6, top_p=0.9),
}


@pytest.fixture(params=["lane", "per-row"])
def scheduler(tiny_model_dir: Path, request: pytest.FixtureRequest) -> Scheduler:
    """Both bookkeeping paths: the steady lane's arrays (steady_lane.py) and the per-row objects."""
    return Scheduler(load_runner(tiny_model_dir, device="cpu", num_slots=16), max_batch=4, lookahead=8,
                     lane=request.param == "lane")


def encode(scheduler: Scheduler, text: str) -> list[int]:
    return [scheduler.chars.index(c) for c in text]


def run(scheduler: Scheduler, iterations: int) -> dict[int, str]:
    """Run iterations; return the text each request generated in them."""
    texts: dict[int, str] = {}
    for _ in range(iterations):
        scheduler.sample()
        scheduler.step()
        for request_id, event in scheduler.take_events():
            texts[request_id] = texts.get(request_id, "") + event.text
    return texts


def generate_all(scheduler: Scheduler, request_id: int, slot: int, n: int, settings: SamplingSettings) -> str:
    """A whole generation, every character delivered as soon as it is made."""
    scheduler.submit(request_id, slot, GenerationRequest((), n, settings))
    text = ""
    while request_id in scheduler.requests:
        text += run(scheduler, 1).get(request_id, "")
        scheduler.ack(request_id, len(text))
    return text


@pytest.mark.parametrize("name", SETTINGS)
def test_abort_at_any_point_continues_exactly_as_the_uninterrupted_text(
    scheduler: Scheduler, name: str, tiny_model_dir: Path
) -> None:
    settings = SETTINGS[name]
    scheduler.open(0, seed=7, prompt_tokens=encode(scheduler, PROMPT))
    reference = generate_all(scheduler, 1, 0, LENGTH_CHARS, settings)
    assert reference == onnx_loop(tiny_model_dir, PROMPT, LENGTH_CHARS, settings, seed=7)
    points = [0, 1, 2, 9, 30, LENGTH_CHARS - 1]
    # Every session in one batch, each cut at its own point.
    for slot, _ in enumerate(points, start=1):
        scheduler.open(slot, seed=7, prompt_tokens=encode(scheduler, PROMPT))
        scheduler.submit(100 + slot, slot, GenerationRequest((), LENGTH_CHARS, settings))
    generated = {slot: "" for slot in range(1, len(points) + 1)}
    for _ in range(LENGTH_CHARS + 20):
        for request_id, text in run(scheduler, 1).items():
            generated[request_id - 100] += text
        for slot, point in enumerate(points, start=1):
            scheduler.ack(100 + slot, min(point, len(generated[slot])))
    for slot, point in enumerate(points, start=1):
        request = scheduler.requests[100 + slot]
        # Ran ahead by exactly the lookahead (or to the end), never further.
        assert len(request.tokens) == min(point + scheduler.lookahead, LENGTH_CHARS)
        assert generated[slot] == reference[: len(request.tokens)]
        scheduler.abort(100 + slot, point)
        state = scheduler.slots[slot]
        assert state.consumed == len(PROMPT) + point
        assert state.recent == (PROMPT + reference[:point])[-256:]
    for slot, point in enumerate(points, start=1):
        rest = generate_all(scheduler, 200 + slot, slot, LENGTH_CHARS - point, settings)
        assert reference[:point] + rest == reference, f"cut at {point}"


def own_row(kept: np.ndarray) -> bool:
    """A kept state [L, H] is its own array, or a row of a block of one request's states [n, L, H]
    (the steady lane copies a row's undo states out as one): either way no batched step's
    [L, B, H] output stays alive for it."""
    block = kept.base
    return block is None or (block.base is None and block.ndim == 3 and block.shape[1:] == kept.shape
                             and block.strides[1:] == kept.strides)


def test_a_finished_request_waits_for_its_final_ack_and_can_still_be_cut_short(scheduler: Scheduler) -> None:
    """Generation may end before delivery does: the last characters can still be undone."""
    settings = SETTINGS["sampled"]
    for slot in (0, 1):
        scheduler.open(slot, seed=3, prompt_tokens=encode(scheduler, PROMPT))
    reference = generate_all(scheduler, 1, 0, 20, settings) + generate_all(scheduler, 2, 0, 20, settings)
    scheduler.submit(3, 1, GenerationRequest((), 20, settings))
    scheduler.ack(3, 0)
    run(scheduler, 40)  # lookahead 8 holds it back until acks come
    assert len(scheduler.requests[3].tokens) == 8
    # Stalled at its lookahead: its kept states are its own rows, not views pinning whole steps.
    assert scheduler.requests[3].window and all(map(own_row, scheduler.requests[3].window.values()))
    scheduler.ack(3, 8)
    run(scheduler, 40)
    scheduler.ack(3, 12)
    run(scheduler, 40)
    request = scheduler.requests[3]
    assert request.status is RequestStatus.FINISHED_LENGTH
    assert "".join(scheduler.chars[t] for t in request.tokens) == reference[:20]  # slot 1 from its start
    scheduler.abort(3, 15)  # the client got 15 of the 20
    assert 3 not in scheduler.requests
    assert generate_all(scheduler, 4, 1, 25, settings) == reference[15:40]


def test_a_finished_request_and_an_undone_session_pin_no_step_of_the_batch(scheduler: Scheduler) -> None:
    """Finished before its caller took anything (max_chars below the lookahead), a request keeps
    copies of its own rows, not views that would keep whole batched steps alive while it waits;
    after the undo the session starts from its own copy too (it may sit idle for its TTL)."""
    settings = SETTINGS["sampled"]
    for slot in (0, 1):
        scheduler.open(slot, seed=slot, prompt_tokens=encode(scheduler, PROMPT))
        scheduler.submit(10 + slot, slot, GenerationRequest((), 5 if slot == 0 else 40, settings))
    run(scheduler, 30)  # nobody acks: slot 0 finishes, slot 1 stalls at its lookahead
    finished = scheduler.requests[10]
    assert finished.status is RequestStatus.FINISHED_LENGTH and finished.stepped == 5
    assert sorted(finished.window) == [1, 2, 3, 4, 5]
    assert all(map(own_row, finished.window.values()))
    scheduler.abort(10, 2)
    start = scheduler.slots[0].start
    assert start is not None and start.base is None


def test_the_finish_travels_with_the_last_character(scheduler: Scheduler, tiny_model_dir: Path) -> None:
    scheduler.open(0, seed=1, prompt_tokens=encode(scheduler, PROMPT))
    scheduler.submit(1, 0, GenerationRequest((), 3, SETTINGS["greedy"]))
    events = []
    for _ in range(len(PROMPT) + 10):
        scheduler.sample()
        scheduler.step()
        events += [event for _, event in scheduler.take_events()]
    assert events[0].accepted and events[0].consumed_chars == len(PROMPT)
    assert [e.text for e in events[1:]] == list(onnx_loop(tiny_model_dir, PROMPT, 3, SETTINGS["greedy"]))
    assert [e.finish for e in events[1:]] == [None, None, LENGTH]


@pytest.mark.parametrize("name", ["greedy", "sampled"])
def test_snapshots_at_any_point_restore_to_the_same_continuation(scheduler: Scheduler, name: str) -> None:
    settings = SETTINGS[name]
    scheduler.open(0, seed=5, prompt_tokens=encode(scheduler, PROMPT))
    reference = generate_all(scheduler, 1, 0, 40, settings)
    scheduler.open(1, seed=5, prompt_tokens=encode(scheduler, PROMPT))
    scheduler.submit(2, 1, GenerationRequest((), 40, settings))
    text = ""
    for point in (0, 3, 11):  # running ahead of delivery: the snapshot is at the delivered point
        for _ in range(3 * scheduler.lookahead):
            text += run(scheduler, 1).get(2, "")
            scheduler.ack(2, min(point, len(text)))
        assert len(text) == point + scheduler.lookahead  # generated ahead, not delivered
        snapshot = scheduler.snapshot(1)
        assert snapshot.consumed_chars == len(PROMPT) + point
        assert (snapshot.logits is None) == bool(snapshot.pending)  # one or the other, never both
        scheduler.restore(9, snapshot)
        assert generate_all(scheduler, 50 + point, 9, 40 - point, settings) == reference[point:]
    scheduler.abort(2, 11)


def test_a_queued_prompt_leaves_no_stale_logits_in_a_snapshot(scheduler: Scheduler) -> None:
    scheduler.open(0, seed=5, prompt_tokens=encode(scheduler, PROMPT))
    generate_all(scheduler, 1, 0, 5, SETTINGS["sampled"])
    # A new call's prompt is queued but not consumed yet (say its deadline passes now).
    scheduler.submit(2, 0, GenerationRequest(tuple(encode(scheduler, " be")), 5, SETTINGS["sampled"]))
    scheduler.abort(2, 0)
    snapshot = scheduler.snapshot(0)
    assert snapshot.logits is None and snapshot.pending == tuple(encode(scheduler, " be"))
    assert snapshot.consumed_chars == len(PROMPT) + 5 + 3


def test_the_host_pool_keeps_the_last_batch_resident_and_writes_it_back_when_needed() -> None:
    import numpy as np

    from server.engine.runner.state_pool import HostStatePool

    pool = HostStatePool(1, 4, 2)
    none = np.zeros(2, bool)
    first = pool.gather(np.array([2, 0]), none)
    pool.scatter(np.array([2, 0]), np.array([[[1.0, 1.0], [2.0, 2.0]]], np.float32))
    assert not first.any()
    same = pool.gather(np.array([2, 0]), none)  # the same batch: the last states as they are
    assert same.tolist() == [[[1.0, 1.0], [2.0, 2.0]]]
    pool.scatter(np.array([2, 0]), same + 10.0)
    swapped = pool.gather(np.array([0, 2]), none)  # another order: written back, then gathered
    assert swapped.tolist() == [[[12.0, 12.0], [11.0, 11.0]]]
    pool.scatter(np.array([0, 2]), swapped + 1.0)
    started = pool.gather(np.array([0, 2]), np.array([True, False]))  # a start row: never resident
    assert started.tolist() == [[[0.0, 0.0], [12.0, 12.0]]]
    pool.scatter(np.array([0, 2]), started)
    assert pool.read(np.array([0, 1, 2])).tolist() == [[[0.0, 0.0], [0.0, 0.0], [12.0, 12.0]]]
