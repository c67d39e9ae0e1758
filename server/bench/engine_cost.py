"""The engine's own cost per iteration, with a model call that does nothing (the null runner).

    python -m server.bench.engine_cost                 # batches 64, 256 and 1024
    python -m server.bench.engine_cost --batches 64 1024 --iterations 400 --json out.json

What it measures: the scheduler's iteration (sampling every generating row,
taking the drawn characters, the step's bookkeeping, the caller's
acknowledgements) over B sessions that all stream at once, with the model
call replaced by one that returns fixed logits and writes nothing. That is
what the server spends per iteration besides the model: on a GPU, where a
step costs about the same at batch 1024 as at batch 1, it is the limit of
the whole service. Each session samples with a plain temperature (the
common case), and every character is acknowledged as soon as it is drawn, as
a client that keeps up would; the pipe and gRPC are not part of it (the
benchmark's ceiling row measures those). With --lagging F, a share F of the
readers is stalled at any time instead, each for twice the lookahead's
iterations in turn: long enough that a row's oldest undo state would fall out
of the steady lane's ring (a slow client, or a fast model that outruns the
writes).
"""

from __future__ import annotations

import argparse
import json
import statistics
import string
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from server.engine import sampling_screen
from server.engine.generation import BLOCK, GenerationRequest
from server.engine.model.model_dir import ModelFile, ModelSpec
from server.engine.runner.model_runner import ModelRunner, RunnerInfo, StepOutput
from server.engine.runtime.process_messages import wire_events
from server.engine.sampling import SamplingSettings
from server.engine.scheduling.scheduler import Scheduler

VOCAB = list(string.ascii_letters + string.digits + " .,;:!?'\n-")  # 65 characters, as Shakespeare's


class NullRunner(ModelRunner):
    """A model whose step costs nothing: fixed logits out, the states left as they are."""

    def __init__(self, num_slots: int, hidden_size: int = 16, num_layers: int = 1):
        spec = ModelSpec(vocab=VOCAB, vocab_size=len(VOCAB), embedding_dim=8, hidden_size=hidden_size,
                         num_layers=num_layers)
        self.info = RunnerInfo(spec, ModelFile(Path("null"), "null", Path("null"), reason="null runner"), "NullRunner",
                               num_slots, states_on_device=False)
        rng = np.random.default_rng(0)
        self._logits = rng.standard_normal((num_slots, len(VOCAB))).astype(np.float32)  # [S, V]
        self._states = np.zeros((num_layers, num_slots, hidden_size), np.float32)  # [L, S, H]

    def step(self, token_ids: np.ndarray, slots: np.ndarray, start_mask: np.ndarray,
             start_states: np.ndarray | None = None) -> StepOutput:
        count = len(token_ids)
        return StepOutput(self._logits[:count], self._states[:, :count])  # [B, V], [L, B, H]

    def read_states(self, slots: np.ndarray) -> np.ndarray:
        return self._states[:, slots]


@dataclass(frozen=True)
class EngineCost:
    batch: int
    iterations: int
    microseconds_per_iteration: float  # median of the repeats
    microseconds_per_row: float
    repeats: list[float]


def stalled_readers(batch: int, iteration: int, lagging: float, stall: int) -> np.ndarray:
    """Which of `batch` readers take nothing in `iteration` ([batch] bool): each one `stall`
    iterations out of every stall / lagging, the readers' turns spread evenly (a share `lagging`)."""
    if lagging <= 0:
        return np.zeros(batch, bool)
    cycle = max(stall, round(stall / lagging))
    phase = (np.arange(batch) * cycle) // batch  # [batch]
    return (iteration + phase) % cycle < stall


def measure(batch: int, iterations: int, repeats: int = 5, lookahead: int = 128, lane: bool = True,
            lagging: float = 0.0) -> EngineCost:
    """Median microseconds per scheduler iteration with `batch` sessions streaming at once: the
    acknowledgements (as the engine process takes them, one list per message), sampling, the
    step's bookkeeping and the events as they go down the pipe (wire_events). What the callers do
    with the events is theirs, outside the clock. `lagging`: the share of readers stalled at a
    time (stalled_readers), each for 2 x lookahead iterations."""
    runner = NullRunner(num_slots=batch)
    scheduler = Scheduler(runner, max_batch=batch, lookahead=lookahead, stretch=False, batch_stretch=0, lane=lane)
    settings = SamplingSettings(temperature=0.8)
    for slot in range(batch):
        scheduler.open(slot, seed=slot, prompt_tokens=[1])
        scheduler.submit(slot + 1, slot, GenerationRequest((), max_chars=10**9, settings=settings))
    delivered = np.zeros(batch + 1, np.int64)  # request id -> characters the caller took
    acked = np.zeros(batch, np.int64)  # request id - 1 -> characters acknowledged (a stalled reader's stay)
    request_ids = np.arange(1, batch + 1)
    count = iter(range(10**12))

    def iteration() -> float:
        reading = ~stalled_readers(batch, next(count), lagging, 2 * lookahead)  # [batch]
        acked[reading] = delivered[1:][reading]
        started = time.perf_counter()
        scheduler.ack_many(request_ids, acked.copy())
        scheduler.sample()
        scheduler.step()
        events, scheduler.events = scheduler.events, []
        wire = wire_events(events)
        spent = time.perf_counter() - started
        # The caller's side: it takes every character at once and acknowledges it.
        for request_id, payload in wire:
            if request_id == BLOCK:
                np.add.at(delivered, payload[0], 1)
            elif isinstance(payload, str):
                delivered[request_id] += len(payload)
        return spent

    for _ in range(20):  # the prompt's step, the first characters, warm caches
        iteration()
    timings = [sum(iteration() for _ in range(iterations)) / iterations * 1e6 for _ in range(repeats)]
    median = statistics.median(timings)
    return EngineCost(batch, iterations, median, median / batch, timings)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m server.bench.engine_cost", description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 256, 1024], help="sessions streaming at once")
    parser.add_argument("--iterations", type=int, default=200, help="iterations per repeat")
    parser.add_argument("--repeats", type=int, default=5, help="repeats per batch (the median is reported)")
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    parser.add_argument("--numpy-screen", action="store_true",
                        help="sample with NumPy only, not the compiled kernel (sampling_kernel.c), to compare")
    parser.add_argument("--no-lane", dest="lane", action="store_false",
                        help="every row through the per-row path (steady_lane.py off), to compare")
    parser.add_argument("--lagging", type=float, default=0.0, metavar="F",
                        help="share of readers stalled at any time, each for twice the lookahead's iterations "
                             "(default: 0, every reader keeps up)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not 0.0 <= args.lagging < 1.0:
        parser.error(f"--lagging must be in [0, 1), got {args.lagging}")
    if args.numpy_screen:
        sampling_screen.COMPILED = False
    print(f"screen: {'compiled' if sampling_screen.COMPILED else 'NumPy'}; lagging readers: {args.lagging:g}")
    results = [measure(batch, args.iterations, args.repeats, lane=args.lane, lagging=args.lagging)
               for batch in args.batches]
    print(f"{'batch':>6} {'us/iteration':>13} {'us/row':>8}  vs first")
    for result in results:
        ratio = result.microseconds_per_iteration / results[0].microseconds_per_iteration
        print(f"{result.batch:>6} {result.microseconds_per_iteration:>13.1f} {result.microseconds_per_row:>8.3f}"
              f"  {ratio:.2f}x")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump([result.__dict__ for result in results], out, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
