"""charstream-bench rows 1 and 4, the ratio of a lone stream: measured alternately, medians reported.

One stream of --chars characters takes tens of milliseconds, and so does the
raw batch-1 loop; on a shared machine their speeds drift by more than the
difference being measured, from one second to the next. So the two rows are
measured in turns (raw loop, server stream, raw loop, ...) --repeats times,
and each reports its median run: drift moves both alike, and a stray pause
moves neither median.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Callable, TypeVar

from server.clients.bench_process import ServerProcess
from server.clients.bench_raw import raw_loop
from server.clients.bench_results import RawResult, Row, StreamsResult

if TYPE_CHECKING:
    from server.clients.bench import Bench

DEFAULT_REPEATS = 25  # runs of ~30 ms each: on a shared machine 5 medians still swung 0.52-0.97 (int8)
R = TypeVar("R", RawResult, StreamsResult)


def add_repeats_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repeats", type=int, default=DEFAULT_REPEATS, metavar="N",
                        help=f"runs of rows 1 and 4, alternately; each reports its median (default: {DEFAULT_REPEATS})")


def single_stream_rows(bench: Bench, server: ServerProcess) -> None:
    """Append rows 1 and 4 (or the failure of both, saying why)."""
    raws: list[RawResult] = []
    streams: list[StreamsResult] = []
    failure: Exception | None = None
    try:
        for _ in range(bench.args.repeats):
            raws.append(raw_loop(bench.cell, 1, bench.args.chars, bench.deadline(), row=1, row_id="raw_batch_1",
                                 title="raw"))
            streams.append(bench.streams_result(server, 1, 4, "server_1_stream", "server"))
    except Exception as exc:  # noqa: BLE001 - both rows fail with it (attempt() reports it)
        failure = exc
    bench.attempt("raw_batch_1", _median_of(raws, failure, other_row=4))
    bench.attempt("server_1_stream", _median_of(streams, failure, other_row=1))


def _median_of(runs: list[R], failure: Exception | None, other_row: int) -> Callable[[int, str, str], Row]:
    def measure(row: int, row_id: str, title: str) -> Row:
        if failure is not None:
            raise failure
        ranked = sorted(runs, key=lambda run: run.chars_per_s)
        median = ranked[len(ranked) // 2]  # a run that happened (the upper one of an even count)
        median.row, median.id, median.title = row, row_id, title
        median.note = (f"median of {len(runs)} runs, in turns with row {other_row} "
                       f"(chars/s {ranked[0].chars_per_s:,.0f}-{ranked[-1].chars_per_s:,.0f})")
        return median

    return measure
