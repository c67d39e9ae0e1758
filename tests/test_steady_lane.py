"""The steady lane (steady_lane.py) against the per-row path it stands in for: driven by the same
random commands (mixed settings, stop strings, short max_chars, partial acknowledgements, aborts,
snapshots, stalled readers, more sessions than a batch), a scheduler with the lane and one
without it give the same events and leave every session in the same state."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from server.bench.engine_cost import NullRunner
from server.engine.generation import BLOCK, GenerationRequest
from server.engine.runner.model_runner import load_runner
from server.engine.sampling import SamplingSettings, choose_token, sample_uncut
from server.engine.scheduling.scheduler import Scheduler

SLOTS = 6


def random_settings(rng: random.Random) -> SamplingSettings:
    kind = rng.choice(["greedy", "plain", "top-k", "top-p", "both"])
    temperature = 0.0 if kind == "greedy" else rng.choice([0.5, 0.9, 1.3])
    return SamplingSettings(temperature=temperature, top_k=rng.choice([3, 8]) if kind in ("top-k", "both") else 0,
                            top_p=rng.choice([0.6, 0.9]) if kind in ("top-p", "both") else 1.0)


class Driver:
    """One scheduler and what its callers saw: the text and ends of every request, acks sent."""

    def __init__(self, scheduler: Scheduler):
        self.scheduler = scheduler
        self.seen: dict[int, list] = {}  # request id -> its events, in order
        self.taken: dict[int, int] = {}  # request id -> characters it has received
        self.most_in_lane = 0

    def iterate(self) -> None:
        self.scheduler.sample()
        self.scheduler.step()
        lane = self.scheduler.lane
        self.most_in_lane = max(self.most_in_lane, len(lane) if lane is not None else 0)
        for request_id, event in self.scheduler.take_events():
            self.seen.setdefault(request_id, []).append((event.text, event.finish, event.matched_stop,
                                                         event.accepted, event.consumed_chars, event.error))
            self.taken[request_id] = self.taken.get(request_id, 0) + len(event.text)


def run_scenario(model: Path, seed: int, stretch: bool, max_batch: int, batch_stretch: int,
                 device_pool: bool = False) -> list[Driver]:
    drivers = []
    for lane in (True, False):
        runner = load_runner(model, device="cpu", num_slots=SLOTS, device_pool=device_pool)
        # In step with the per-row path: the lane's own stretches (lane_stretch.py) keep different
        # characters per call than batch_stretch.py's, which test_lane_stretch.py compares apart.
        drivers.append(Driver(Scheduler(runner, max_batch=max_batch, lookahead=6, stretch=stretch,
                                           batch_stretch=batch_stretch, lane=lane, lane_stretch=False)))
    rng = random.Random(seed)
    chars = drivers[0].scheduler.chars
    next_id = 1
    running: dict[int, int] = {}  # slot -> request id
    for slot in range(SLOTS):
        prompt = [rng.randrange(len(chars)) for _ in range(rng.randint(1, 5))]
        for driver in drivers:
            driver.scheduler.open(slot, seed + slot, prompt)
    snapshots: list[tuple] = []
    stalled: dict[int, int] = {}  # request id -> iterations its reader still takes nothing
    for _ in range(160):
        action = rng.random()
        slot = rng.randrange(SLOTS)
        for driver in drivers:  # finished requests are settled by their final ack
            for other, request_id in list(running.items()):
                if request_id not in driver.scheduler.requests:
                    running.pop(other, None)
        if action < 0.25 and slot not in running:
            settings = random_settings(rng)
            stops = (rng.choice(chars) + rng.choice(chars),) if rng.random() < 0.25 else ()
            spec = GenerationRequest(tuple(rng.randrange(len(chars)) for _ in range(rng.randint(0, 3))),
                                     rng.choice([3, 9, 40, 200]), settings, seed=rng.choice([None, rng.randrange(99)]),
                                     stops=stops)
            for driver in drivers:
                driver.scheduler.submit(next_id, slot, spec)
            running[slot] = next_id
            next_id += 1
        elif action < 0.3 and slot in running:
            request_id = running.pop(slot)
            for driver in drivers:
                driver.scheduler.abort(request_id, driver.taken.get(request_id, 0))
        elif action < 0.35:
            snapshots.append(tuple(snapshot_fields(driver.scheduler, slot) for driver in drivers))
        # Acknowledge what each request received so far, but only some of the time: readers stall,
        # now and then for long enough that a lane row's undo states would fall out of the ring.
        for request_id in running.values():
            if request_id not in stalled and rng.random() < 0.04:
                stalled[request_id] = rng.randint(6, 30)
        stalled = {r: left - 1 for r, left in stalled.items() if left > 1}
        acks = [(request_id, drivers[0].taken.get(request_id, 0)) for request_id in running.values()
                if request_id not in stalled and rng.random() < 0.7]
        for driver in drivers:
            assert all(driver.taken.get(r, 0) == count for r, count in acks), "callers saw different text"
            if acks:
                driver.scheduler.ack_many(np.array([r for r, _ in acks]), np.array([c for _, c in acks]))
        for driver in drivers:
            driver.iterate()
    for slot in range(SLOTS):
        snapshots.append(tuple(snapshot_fields(driver.scheduler, slot) for driver in drivers))
    for with_lane, per_row in snapshots:
        assert with_lane == per_row
    return drivers


def snapshot_fields(scheduler: Scheduler, slot: int) -> tuple:
    try:
        snapshot = scheduler.snapshot(slot)
    except (LookupError, ValueError) as exc:
        return ("refused", str(exc))
    logits = None if snapshot.logits is None else snapshot.logits.tobytes()
    return (snapshot.hidden.tobytes(), logits, snapshot.pending, snapshot.stream_key, snapshot.position,
            snapshot.consumed_chars, snapshot.recent_text)


def test_the_scenarios_stall_readers_long_enough_to_spill(tiny_model_dir: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The scenarios above reach SteadyLane.spill (their stalled readers), so its rows are among
    those whose events and states they compare with the per-row path's."""
    from server.engine.scheduling.steady_lane import SteadyLane

    spilled: list[int] = []
    spill = SteadyLane.spill

    def counting(lane: SteadyLane, rows: np.ndarray) -> None:
        spilled.extend(lane.rid[rows].tolist())
        spill(lane, rows)

    monkeypatch.setattr(SteadyLane, "spill", counting)
    for seed in range(3):
        run_scenario(tiny_model_dir, seed, False, 8, 16)
    assert len(spilled) >= 3, spilled


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("stretch,max_batch,batch_stretch", [(False, 8, 16), (True, 8, 16), (True, 8, 0), (False, 3, 16)])
@pytest.mark.parametrize("device_pool", [False, True])  # True: the states CUDA keeps on the device
def test_the_lane_gives_what_the_per_row_path_gives(tiny_model_dir: Path, seed: int, stretch: bool,
                                                    max_batch: int, batch_stretch: int, device_pool: bool) -> None:
    with_lane, per_row = run_scenario(tiny_model_dir, seed, stretch, max_batch, batch_stretch, device_pool)
    assert with_lane.seen == per_row.seen
    assert sum(len(events) for events in with_lane.seen.values()) > 50  # the scenario did generate
    assert with_lane.most_in_lane >= 2 and per_row.most_in_lane == 0


def test_the_lane_holds_steady_streams_and_emits_blocks() -> None:
    """With every stream plainly running, the lane holds them all and an iteration's characters
    leave as one block (what makes the iteration's cost flat in the batch)."""
    batch = 32
    scheduler = Scheduler(NullRunner(batch), max_batch=batch, lookahead=16, stretch=False)
    for slot in range(batch):
        scheduler.open(slot, slot, [1])
        scheduler.submit(slot + 1, slot, GenerationRequest((), 10**6, SamplingSettings(temperature=0.8)))
    for _ in range(5):
        scheduler.sample()
        scheduler.step()
    assert scheduler.lane is not None and len(scheduler.lane) == batch
    scheduler.events.clear()
    scheduler.sample()
    assert [request_id for request_id, _ in scheduler.events] == [BLOCK]
    assert sorted(scheduler.events[0][1].request_ids.tolist()) == list(range(1, batch + 1))


def test_a_stalled_reader_spills_its_undo_states_and_stays_in_the_lane() -> None:
    """A reader that takes nothing while the others go on: its undo states would fall out of the
    lane's ring, so they move to its Request's window as copies and the row stays in the lane
    (the lane-against-per-row scenarios check that undoing it still lands exactly)."""
    scheduler = Scheduler(NullRunner(4), max_batch=4, lookahead=4, stretch=False)
    for slot in range(4):
        scheduler.open(slot, slot, [1])
        scheduler.submit(slot + 1, slot, GenerationRequest((), 10**6, SamplingSettings(temperature=0.0)))
    delivered = dict.fromkeys(range(1, 5), 0)
    lane = scheduler.lane
    assert lane is not None
    in_lane = []  # whether request 1 was in the lane after each iteration
    for _ in range(30):
        scheduler.sample()
        scheduler.step()
        for request_id, event in scheduler.take_events():
            delivered[request_id] += len(event.text)
        for request_id in (2, 3, 4):  # request 1 is never acknowledged past its first character
            scheduler.ack(request_id, delivered[request_id])
        scheduler.ack(1, 1)
        in_lane.append(1 in lane.row_of_request)
    assert in_lane[2:] == [True] * 28  # in from its first lane steps on, and it never left
    row = lane.row_of_request[1]
    request = scheduler.requests[1]
    stepped = int(lane.stepped[row])
    assert stepped == 1 + 4 and lane.entered[row] == stepped  # stalled at its lookahead, every state spilled
    assert sorted(request.window) == list(range(1, stepped + 1))  # what undoing to 1 .. stepped needs
    # Copies, of its own: none shares memory with the states the runner's steps handed out.
    assert not any(np.shares_memory(kept, scheduler.runner._states) for kept in request.window.values())
    assert lane.expiring().size == 0  # nothing left in the ring to expire
    scheduler.leave_lane()  # leaving adds nothing twice: the window is as it was
    assert sorted(request.window) == list(range(1, stepped + 1))


def test_the_column_sampler_is_the_reference_sampler() -> None:
    """sample_uncut on a large batch (laid out as columns) picks choose_token's token on every row,
    boundary random numbers included."""
    rng = np.random.default_rng(5)
    for _ in range(5):
        rows = int(rng.integers(128, 700))
        logits = (rng.standard_normal((rows, 65)) * rng.uniform(0.1, 30)).astype(np.float32)
        temperature = rng.uniform(0.05, 3.0, rows)
        uniforms = rng.random(rows)
        uniforms[:3] = [0.0, 1 - 2**-53, 0.5]
        expected = [choose_token(logits[i], SamplingSettings(temperature[i]), uniforms[i]) for i in range(rows)]
        assert sample_uncut(logits, temperature, uniforms).tolist() == expected


def test_merged_blocks_keep_each_requests_characters_in_order() -> None:
    """The server's side: a run of blocks becomes one text per request, its characters in the order
    they were drawn, whatever the vocabulary's entries are made of."""
    from server.engine.generation import merge_blocks

    blocks = [(np.array([3, 1, 2]), np.array([0, 1, 2])), (np.array([1, 3]), np.array([3, 4])),
              (np.array([2]), np.array([5]))]
    assert merge_blocks(blocks, np.array(list("abcdef"))) == [(1, "bd"), (2, "cf"), (3, "ae")]
    combining = np.array(["a", "é", "ß", "e\u0301"])  # the last entry is two code points
    assert merge_blocks([(np.array([1, 2, 1]), np.array([3, 1, 2]))], combining) == [(1, "e\u0301ß"), (2, "é")]


def test_a_batch_stretch_block_expands_to_one_text_per_request() -> None:
    """A batch's stretch sends its rows' characters as one block with several characters a request
    (batch_stretch.step_together): the engine on a thread turns it into one text event per request,
    the server's side into one text per request as well, each in the order drawn; the engine
    process sends such a block at once (it is a whole call's characters, not one to hold)."""
    from server.engine.generation import (
        BLOCK,
        CharBlock,
        StreamEvent,
        expand_events,
        merge_blocks,
    )

    chars = list("abcdef")
    text_events = [StreamEvent(text=c) for c in chars]
    block = CharBlock(np.array([7, 7, 7, 9, 9]), np.array([0, 1, 2, 5, 4]), several=True)
    finished = StreamEvent(text="c", finish="length")
    events = expand_events([(BLOCK, block), (8, finished)], text_events)
    assert [(rid, e.text) for rid, e in events] == [(7, "abc"), (9, "fe"), (8, "c")]
    assert all(e.is_plain_text for rid, e in events if rid != 8) and events[2][1] is finished
    assert merge_blocks([(block.request_ids, block.tokens)], np.array(chars)) == [(7, "abc"), (9, "fe")]
    lane = CharBlock(np.array([7, 9]), np.array([3, 3]))  # the steady lane's: one character a request
    assert [(rid, e.text) for rid, e in expand_events([(BLOCK, lane)], text_events)] == [(7, "d"), (9, "d")]


@pytest.mark.parametrize("in_row_order", [False, True])
def test_repeated_acks_land_on_the_right_rows_after_rows_move(in_row_order: bool) -> None:
    """The lane reuses an ack's row lookup while its ids repeat and no row moved (acks of every row
    in row order take slices); a row leaving (here: aborted, its row refilled by the last one) must
    not send a repeated ack to the wrong row."""
    batch = 8
    scheduler = Scheduler(NullRunner(batch), max_batch=batch, lookahead=64, stretch=False)
    for slot in range(batch):
        scheduler.open(slot, slot, [1])
        scheduler.submit(slot + 1, slot, GenerationRequest((), 10**6, SamplingSettings(temperature=0.8)))
    for _ in range(30):  # about 29 characters each: every ack below is below what was generated
        scheduler.sample()
        scheduler.step()
    lane = scheduler.lane
    assert lane is not None and len(lane) == batch
    ids = lane.rid[: lane.n].copy() if in_row_order else np.arange(batch, 0, -1)
    assert in_row_order == np.array_equal(ids, lane.rid[: lane.n])

    def delivered() -> dict[int, int]:
        return {int(rid): int(count) for rid, count in zip(lane.rid[: lane.n], lane.delivered[: lane.n])}

    for count in (1, 3):  # the same ids twice: the second call takes the cached rows
        scheduler.ack_many(ids, count + ids)  # a different count per request
        assert delivered() == {int(r): count + int(r) for r in ids}
    scheduler.abort(2, 1)  # row of request 2 leaves; the last row moves into it
    assert 2 not in lane.row_of_request
    scheduler.ack_many(ids, 5 + ids)
    assert delivered() == {int(r): 5 + int(r) for r in ids if r != 2}
    rest = lane.rid[: lane.n].copy()  # the rows now, in row order: slices again
    scheduler.ack_many(rest, np.full(rest.size, 10**6))  # more than was generated: capped at it
    assert delivered() == {int(r): int(lane.generated[lane.row_of_request[int(r)]]) for r in rest}


def test_long_streams_keep_every_character_through_the_lanes_saved_blocks() -> None:
    """Rows that run past the lane's token store (steady_lane.TOKENS characters) several times,
    entering at different iterations and with a row leaving midway (rows move), end with the very
    characters, and sessions, that the per-row path gives."""
    from server.engine.scheduling.steady_lane import TOKENS

    class SlotRunner(NullRunner):  # each slot its own fixed logits, wherever its row sits in the batch
        def step(self, token_ids, slots, start_mask, start_states=None):  # type: ignore[no-untyped-def]
            out = super().step(token_ids, slots, start_mask, start_states)
            logits = self._logits[slots] + np.float32(0.1) * token_ids[:, None].astype(np.float32)  # [B, V]
            return type(out)(logits, out.inputs)

    batch, iterations = 5, 2 * TOKENS + 300
    drivers = []
    for lane in (True, False):
        scheduler = Scheduler(SlotRunner(batch), max_batch=batch, lookahead=8, stretch=False, lane=lane)
        for slot in range(batch):
            scheduler.open(slot, 40 + slot, [1])
        drivers.append(Driver(scheduler))
    settings = SamplingSettings(temperature=0.9)
    for i in range(iterations):
        for driver in drivers:
            if i < batch * 37 and i % 37 == 0:  # one more stream every 37 iterations
                driver.scheduler.submit(i // 37 + 1, i // 37, GenerationRequest((), 10**6, settings))
            if i == TOKENS + 50:
                driver.scheduler.abort(2, driver.taken.get(2, 0))  # its row leaves; the last row moves in
            driver.iterate()
            ids = np.array(sorted(driver.taken), np.int64)
            driver.scheduler.ack_many(ids, np.array([driver.taken[r] for r in ids], np.int64))
    with_lane, per_row = drivers
    assert with_lane.most_in_lane == batch
    with_lane.scheduler.leave_lane()
    texts = [{rid: "".join(e[0] for e in events) for rid, events in d.seen.items()} for d in drivers]
    assert texts[0] == texts[1]
    assert min(len(text) for rid, text in texts[0].items() if rid != 2) > 2 * TOKENS
    for request_id, request in per_row.scheduler.requests.items():
        assert with_lane.scheduler.requests[request_id].tokens == request.tokens


def test_lagging_readers_in_the_engine_cost_stall_in_turns_and_make_rows_spill(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """server.bench.engine_cost --lagging: a share of the readers stalled at a time, each for its
    turn of `stall` iterations; long enough that lane rows spill their undo states (and stay)."""
    from server.bench import engine_cost
    from server.engine.scheduling.steady_lane import SteadyLane

    batch, stall, lagging = 40, 16, 0.25
    turns = np.array([engine_cost.stalled_readers(batch, i, lagging, stall) for i in range(200)])  # [200, batch]
    assert turns.sum(axis=1).min() >= batch * lagging - 1 and turns.sum(axis=1).max() <= batch * lagging + 1
    cycle = round(stall / lagging)
    assert (turns[:cycle].sum(axis=0) == stall).all()  # every reader stalls one turn a cycle, of `stall`
    assert not engine_cost.stalled_readers(batch, 3, 0.0, stall).any()
    spilled: list[int] = []
    spill = SteadyLane.spill

    def counting(lane: SteadyLane, rows: np.ndarray) -> None:
        spilled.extend(rows.tolist())
        spill(lane, rows)

    monkeypatch.setattr(SteadyLane, "spill", counting)
    engine_cost.measure(16, 40, repeats=1, lookahead=4, lagging=0.25)
    assert spilled
    spilled.clear()
    engine_cost.measure(16, 40, repeats=1, lookahead=4)  # readers that keep up: nothing to spill
    assert not spilled
