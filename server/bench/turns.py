"""charstream-bench rows measured in turns with their raw loop, medians reported: rows 1 and 4
(one stream), rows 2 and 5 (a batch of streams).

A server row is only read as a ratio to its raw loop, and on a shared machine
speeds drift by more than the difference being measured, from one second to
the next: a lone stream's run, or the batch-1 loop's, lasts tens of
milliseconds, a batch's run about a second. So each server row is measured in
turns with its raw loop (raw loop, server, raw loop, ...), and each reports its
median run: drift moves both alike, and a stray pause moves neither median.
"""

from __future__ import annotations

import argparse
from typing import TypeVar

from server.bench.context import BenchContext, Measure
from server.bench.process import ServerProcess
from server.bench.raw import raw_loop
from server.bench.results import RawResult, Row, StreamsResult

DEFAULT_REPEATS = 25  # runs of ~30 ms each: on a shared machine 5 medians still swung 0.52-0.97 (int8)
DEFAULT_STREAMS_REPEATS = 5  # runs of ~1.5 s each (both rows): measured once, row 5 / row 2 swung 0.64-0.74
R = TypeVar("R", RawResult, StreamsResult)


def add_repeats_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repeats", type=int, default=DEFAULT_REPEATS, metavar="N",
                        help=f"runs of rows 1 and 4, alternately; each reports its median (default: {DEFAULT_REPEATS})")
    parser.add_argument("--streams-repeats", type=int, default=DEFAULT_STREAMS_REPEATS, metavar="N",
                        help="runs of rows 2 (its batch of --streams, else the first --batch) and 5, alternately; "
                             f"each reports its median (default: {DEFAULT_STREAMS_REPEATS})")


def rows_in_turns(bench: BenchContext, server: ServerProcess, batch: int, streams: int, repeats: int,
                  raw_id: str, server_id: str) -> None:
    """Append the raw loop's row at `batch` and the server's at `streams` (or the failure of both,
    saying why), each the median of `repeats` runs taken in turns."""
    raws: list[RawResult] = []
    served: list[StreamsResult] = []
    failure: Exception | None = None
    try:
        for _ in range(repeats):
            raws.append(raw_loop(bench.cell, batch, bench.args.chars, bench.deadline(), row=0, row_id=raw_id,
                                 title="raw"))
            served.append(bench.streams_result(server, streams, 0, server_id, "server"))
    except Exception as exc:  # noqa: BLE001 - both rows fail with it (attempt() reports it)
        failure = exc
    bench.attempt(raw_id, _median_of(raws, failure, other=bench.row_number(server_id)))
    bench.attempt(server_id, _median_of(served, failure, other=bench.row_number(raw_id)))


def _median_of(runs: list[R], failure: Exception | None, other: int) -> Measure:
    def measure(row: int, row_id: str, title: str) -> Row:
        if failure is not None:
            raise failure
        ranked = sorted(runs, key=lambda run: run.chars_per_s)
        median = ranked[len(ranked) // 2]  # a run that happened (the upper one of an even count)
        median.row, median.id, median.title = row, row_id, title
        runs_said = f"median of {len(runs)} runs" if len(runs) > 1 else "1 run"
        median.note = (f"{runs_said}, in turns with row {other} "
                       f"(chars/s {ranked[0].chars_per_s:,.0f}-{ranked[-1].chars_per_s:,.0f})")
        return median

    return measure
