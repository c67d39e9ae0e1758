"""What a row module sees of the charstream-bench run it measures for: the run's type, as a protocol.

The row modules (turns.py, sessions.py, ceiling.py) record their rows through
the run, and the run (bench.py) calls them. With the run's type here rather
than in bench.py, the row modules need not import the module that imports
them, and the package's imports point one way:

    bench -> args -> turns, sessions, ceiling -> context -> results

bench.Bench is the one implementation; it satisfies this protocol by shape.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from typing import Protocol, TextIO

import onnxruntime as ort

from protos.charstream.v1 import generator_pb2 as pb
from server.bench.process import ServerProcess
from server.bench.results import Row, StreamsResult

# measure(row number, row id, title) -> the row: one row's measurement, run (and its failure caught) by attempt().
Measure = Callable[[int, str, str], Row]


class BenchContext(Protocol):
    args: argparse.Namespace
    log: TextIO  # progress lines; the table goes to stdout
    info: pb.GetModelInfoResponse | None  # the served model, once a server has answered
    cell: ort.InferenceSession | None  # the raw step model of rows 1 and 2

    @property
    def prompt(self) -> str:
        """The streams' prompt, on the served model's vocabulary."""
        ...

    def attempt(self, row_id: str, measure: Measure) -> None:
        """Run one row; a failure becomes a failed row saying why."""
        ...

    def note(self, row_id: str, status: str, why: str) -> None:
        """A row that was skipped or failed, saying why."""
        ...

    def fail_unmeasured(self, row_ids: Sequence[str], exc: Exception) -> None:
        """Fail, with `exc`'s reason, each of `row_ids` that has no row yet."""
        ...

    def deadline(self) -> float:
        """time.monotonic() by which the current row must be done (--timeout)."""
        ...

    def row_number(self, row_id: str) -> int:
        """The number a row id is printed with."""
        ...

    def streams_result(self, server: ServerProcess, streams: int, row: int, row_id: str, title: str) -> StreamsResult:
        """`streams` one-shot streams of --chars characters against `server`, measured once."""
        ...
