"""The steady lane's stretches (lane_stretch.py) against the paths they stand in for.

A lane stretch keeps a different number of characters per call than an
ordinary step or batch_stretch.py's call, so schedulers on different paths do
not run in step; what must agree is what a client can see. Each scheduler
below plays the same script per session (requests with mixed settings, stop
strings, short max_chars, cancels at set points) with readers that stall at
random, each scheduler with its own random acknowledgements: every request's
delivered text and end, and every session's final state, must be the same on
the lane's stretches, on batch_stretch.py's per-row path, and (text, ends and
counters) on single ordinary steps.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from server.engine.generation import GenerationRequest
from server.engine.runner.model_runner import load_runner
from server.engine.sampling import SamplingSettings
from server.engine.scheduling import lane_glue, lane_stretch
from server.engine.scheduling.scheduler import Scheduler
from server.engine.scheduling.steady_lane import TOKENS
from tests.test_steady_lane import snapshot_fields

SLOTS = 6
CUT = "cut"  # a request's end when the script cancels it


@dataclass(frozen=True)
class Scripted:
    request_id: int
    spec: GenerationRequest
    cut_at: int | None  # cancel once this many characters arrived, delivering exactly these


def script(seed: int, chars: int) -> dict[int, list[Scripted]]:
    """Each slot's requests, in order: mostly plain temperatures (the lane's stretches), some
    greedy or top-k (ordinary steps beside them), some with stop strings (outside the lane)."""
    rng = random.Random(seed)
    plan: dict[int, list[Scripted]] = {}
    for slot in range(SLOTS):
        plan[slot] = []
        for index in range(rng.randint(2, 4)):
            kind = rng.random()
            settings = (SamplingSettings(0.0) if kind < 0.1 else SamplingSettings(0.9, top_k=5) if kind < 0.2
                        else SamplingSettings(rng.choice([0.6, 1.0, 1.3])))
            stops = (rng.choice("etaoin ") + rng.choice("etaoin "),) if rng.random() < 0.15 else ()
            max_chars = rng.choice([3, 9, 40, 120, 300])
            cut_at = rng.choice([None, None, 0, 1, rng.randrange(1, max_chars + 1)])
            prompt = tuple(rng.randrange(chars) for _ in range(rng.choice([0, 1, 4])))
            plan[slot].append(Scripted(slot * 100 + index + 1, GenerationRequest(
                prompt, max_chars, settings, seed=rng.choice([None, rng.randrange(99)]), stops=stops), cut_at))
        # Last, a request that runs to its end: its text shows the session was left where the others left it.
        plan[slot].append(Scripted(slot * 100 + 99, GenerationRequest((), 40, SamplingSettings(1.0)), None))
    return plan


def play(model: Path, plan: dict[int, list[Scripted]], seed: int, max_batch: int, device_pool: bool = False,
         **paths: bool) -> tuple[dict, list]:
    """Run the script on one scheduler; (request id -> (delivered text, end), final slot snapshots).
    `device_pool`: states in the device runner's pool (device_runner.py), on the CPU provider."""
    runner = load_runner(model, device="cpu", num_slots=SLOTS, device_pool=device_pool)
    assert runner.info.states_on_device == device_pool
    scheduler = Scheduler(runner, max_batch=max_batch, lookahead=12, **paths)  # type: ignore[arg-type]
    # The readers differ per scheduler.
    rng = random.Random(seed * 7 + len(paths) + sum(paths.values()) + 3 * device_pool)
    for slot in range(SLOTS):
        scheduler.open(slot, 1000 + slot, [slot % len(scheduler.chars)])
    queue = {slot: list(requests) for slot, requests in plan.items()}
    running: dict[int, Scripted] = {}  # slot -> its request now
    text: dict[int, str] = {}
    ends: dict[int, tuple[str, str]] = {}
    stalled: dict[int, int] = {}
    for _ in range(4000):
        for slot in range(SLOTS):
            if slot not in running and queue[slot]:
                running[slot] = queue[slot].pop(0)
                scheduler.submit(running[slot].request_id, slot, running[slot].spec)
                text[running[slot].request_id] = ""
        if not running:
            break
        scheduler.sample()
        scheduler.step()
        finished = {}
        for request_id, event in scheduler.take_events():
            assert not event.error, event.error
            text[request_id] += event.text
            if event.finish:
                finished[request_id] = event.finish
        acks = []
        for slot, scripted in list(running.items()):
            request_id, got = scripted.request_id, text[scripted.request_id]
            if scripted.cut_at is not None and len(got) >= scripted.cut_at:
                scheduler.abort(request_id, scripted.cut_at)  # delivered: exactly the first cut_at
                ends[request_id] = (got[: scripted.cut_at], CUT)
                del running[slot]
            elif request_id in finished:
                scheduler.ack(request_id, len(got))  # the final ack settles it
                ends[request_id] = (got, finished[request_id])
                del running[slot]
            elif request_id not in stalled and rng.random() < 0.05:
                stalled[request_id] = rng.randint(5, 40)  # a reader that takes nothing for a while
            elif request_id not in stalled and rng.random() < 0.8:
                acks.append((request_id, len(got)))
        stalled = {r: left - 1 for r, left in stalled.items() if left > 1}
        if acks:
            scheduler.ack_many(np.array([r for r, _ in acks]), np.array([c for _, c in acks]))
    assert not running and not any(queue.values()), "the script did not finish"
    return ends, [snapshot_fields(scheduler, slot) for slot in range(SLOTS)]


@pytest.fixture
def lane_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The rows of each call the lane's stretches made, while the test runs."""
    calls: list[int] = []
    real = lane_glue.stretch_lane

    def counting(*args: object) -> object:
        call = real(*args)  # type: ignore[arg-type]
        calls.extend([args[2].size] if call is not None else [])  # type: ignore[attr-defined]
        return call

    monkeypatch.setattr(lane_glue, "stretch_lane", counting)
    return calls


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("max_batch", [8, 4])
def test_lane_stretches_give_what_the_other_paths_give(tiny_model_dir: Path, seed: int, max_batch: int,
                                                       lane_calls: list[int]) -> None:
    calls = lane_calls
    plan = script(seed, 20)
    lane_ends, lane_states = play(tiny_model_dir, plan, seed, max_batch)
    # More requests than a batch keep the lane empty (the per-row path's fairness decides): the lane
    # runs there only once few enough are left, which some scripts never reach.
    assert max(calls, default=0) >= 2 or max_batch < SLOTS, "the lane's stretches never ran"
    lane_calls = len(calls)
    per_row_ends, per_row_states = play(tiny_model_dir, plan, seed, max_batch, lane_stretch=False)
    single_ends, single_states = play(tiny_model_dir, plan, seed, max_batch, stretch=False, lane=False)
    assert len(calls) == lane_calls  # the other two never took the lane's path
    # The same calls over a device state pool (the path CUDA takes), on the CPU provider.
    device_ends, device_states = play(tiny_model_dir, plan, seed, max_batch, device_pool=True)
    assert len(calls) > lane_calls or lane_calls == 0, "the lane never stretched over the device pool"
    assert device_ends == lane_ends and device_states == lane_states
    assert lane_ends == per_row_ends == single_ends
    # Both stretching paths leave each session with the same state, logits and queue, bit for bit.
    # Single steps may leave a sampled character consumed where a stretch left it queued: the same
    # session (its last request's text above), so only the counters are compared there.
    assert lane_states == per_row_states
    assert [fields[3:] for fields in lane_states] == [fields[3:] for fields in single_states]
    assert sum(len(text) for text, _ in lane_ends.values()) > 300  # the script did generate
    assert any(end == CUT for _, end in lane_ends.values())


def test_a_stop_string_request_outside_the_lane_does_not_hold_it_to_single_steps(
        tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, lane_calls: list[int]) -> None:
    """A request with stop strings stays outside the lane and samples every iteration; the lane's
    rows still stretch (a call of their own beside the outside row's), and every text is the one
    single steps give."""
    calls = lane_calls
    single_steps = []  # lane rows of each ordinary step the lane took
    step_with_lane = Scheduler._step_with_lane

    def counting_steps(scheduler: Scheduler, ready: list, lane_rows: np.ndarray) -> None:
        single_steps.append(lane_rows.size)
        step_with_lane(scheduler, ready, lane_rows)

    monkeypatch.setattr(Scheduler, "_step_with_lane", counting_steps)
    plan: dict[int, list[Scripted]] = {slot: [] for slot in range(SLOTS)}
    for slot in range(4):  # plain streams, and one with a stop string that does not occur in 300
        stops = ("QZ",) if slot == 0 else ()
        plan[slot].append(Scripted(slot + 1, GenerationRequest((), 300, SamplingSettings(1.0), stops=stops), None))
    lane_ends, lane_states = play(tiny_model_dir, plan, 0, 8)
    stretched, stepped = len(calls), len(single_steps)
    single_ends, _ = play(tiny_model_dir, plan, 0, 8, stretch=False, lane=False)
    assert lane_ends == single_ends and lane_ends[1][1] == "length"  # the stop string never matched
    # The lane's three rows stretched, and (the stop-string row beside them) hardly ever took a
    # single step: holding them to single steps took 77 of them in this script.
    assert stretched >= 10 and max(calls) == 3
    assert stepped <= stretched // 10, (stepped, stretched)


def test_a_huge_batch_stretch_is_bounded_by_what_the_lane_holds(tiny_model_dir: Path) -> None:
    """--batch-stretch far above half the lookahead and the lane's store of characters: the lane's
    calls (and its undo ring) are sized by what a call can keep, and the text is unchanged."""
    plan: dict[int, list[Scripted]] = {slot: [] for slot in range(SLOTS)}
    for slot in range(2):
        plan[slot].append(Scripted(slot + 1, GenerationRequest((), 2500, SamplingSettings(1.0)), None))
    texts = []
    for lane_stretch in (True, False):
        runner = load_runner(tiny_model_dir, device="cpu", num_slots=SLOTS)
        scheduler = Scheduler(runner, max_batch=8, lookahead=4096, batch_stretch=5000, lane_stretch=lane_stretch)
        if lane_stretch:
            assert scheduler.lane is not None and scheduler.lane.advance == 1 + TOKENS
        for slot in range(2):
            scheduler.open(slot, 1000 + slot, [0])
            scheduler.submit(slot + 1, slot, plan[slot][0].spec)
        got = {1: "", 2: ""}
        for _ in range(3000):
            scheduler.sample()
            scheduler.step()
            for request_id, event in scheduler.take_events():
                assert not event.error, event.error
                got[request_id] += event.text
            scheduler.ack_many(np.array([1, 2]), np.array([len(got[1]), len(got[2])]))
            if len(got[1]) == len(got[2]) == 2500:
                break
        texts.append(got)
    assert texts[0] == texts[1] and len(texts[0][1]) == 2500


@pytest.mark.parametrize("device_pool", [False, True])
def test_draws_the_check_disputes_are_drawn_again_and_their_rows_states_rewritten(
        tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, lane_calls: list[int], device_pool: bool) -> None:
    """A call's state for each row is the one after the characters it may keep; where the NumPy
    check disputes a draw the row keeps fewer, and its pooled state must be written again (the one
    after its last kept character). Disputes are all but unseen in real draws, so here the check
    reports one at random in about a third of the rows: the lane then draws those characters
    itself, and texts, ends and sessions must still be those of single steps."""
    rng = np.random.default_rng(5)
    disputes = []
    real = lane_stretch.agreed_lengths

    def disputing(tokens: np.ndarray, *args: object) -> np.ndarray:
        agreed = real(tokens, *args)  # type: ignore[arg-type]
        early = rng.integers(0, len(tokens), agreed.shape)  # [R]
        chosen = rng.random(agreed.shape) < 0.35
        disputes.append(int((chosen & (early < agreed)).sum()))
        return np.where(chosen, np.minimum(agreed, early), agreed)

    monkeypatch.setattr(lane_stretch, "agreed_lengths", disputing)
    plan = script(3, 20)
    lane_ends, lane_states = play(tiny_model_dir, plan, 3, 8, device_pool=device_pool)
    assert len(lane_calls) >= 5 and sum(disputes) >= 10, (len(lane_calls), sum(disputes))
    # batch_stretch.py's per-row path has a check of its own, not disputed here: bit for bit the same
    # sessions, so the rewritten states are the right ones.
    per_row_ends, per_row_states = play(tiny_model_dir, plan, 3, 8, lane_stretch=False)
    single_ends, _ = play(tiny_model_dir, plan, 3, 8, stretch=False, lane=False)
    assert lane_ends == per_row_ends == single_ends
    assert lane_states == per_row_states
