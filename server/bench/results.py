"""charstream-bench results: one dataclass per row kind, the ratios, the table printer and the JSON file.

Every row has `row` (its number in server/README.md#benchmark), `id` (stable
across runs with the same flags), `title` and `status` ("ok", "skipped" or
"failed", with `note` saying why).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence, TextIO

SCHEMA = "charstream-bench/1"


@dataclass(kw_only=True)
class Row:
    row: int
    id: str
    title: str
    status: str = "ok"
    note: str = ""

    def cells(self) -> dict[str, Any]:
        """Table cells by column name; missing columns print blank."""
        return {}


@dataclass(kw_only=True)
class NoteRow(Row):
    """A row that was skipped or failed; `note` says why."""


@dataclass(kw_only=True)
class LoopResult(Row):
    """A model stepped in the bench process, no server: `steps` timed steps (rows 1-3 and 12's raw loop)."""

    steps: int
    seconds: float
    chars_per_s: float
    step_ms: float

    def cells(self) -> dict[str, Any]:
        return {"chars/s": self.chars_per_s, "step ms": self.step_ms}


@dataclass(kw_only=True)
class RawResult(LoopResult):
    """ONNX Runtime step loop at `batch`, argmax fed back."""

    batch: int
    provider: str


@dataclass(kw_only=True)
class TorchResult(LoopResult):
    """Naive PyTorch eager loop, one stream: one model call per character."""

    device: str
    torch_threads: int


@dataclass(kw_only=True)
class StreamsResult(Row):
    """`streams` concurrent one-shot Generate streams, as the clients saw them."""

    streams: int
    chars_per_stream: int
    total_chars: int
    messages: int
    seconds: float
    chars_per_s: float
    chars_per_message: float
    first_char_ms_p50: float
    first_char_ms_p99: float
    gap_ms_p50: float
    gap_ms_p99: float
    mean_batch: float | None
    server_flags: list[str] = field(default_factory=list)
    client_processes: int = 1  # the processes the clients ran in (spread.py)

    def cells(self) -> dict[str, Any]:
        return {"chars/s": self.chars_per_s, "1st ms p50": self.first_char_ms_p50,
                "1st ms p99": self.first_char_ms_p99, "gap ms p50": self.gap_ms_p50,
                "gap ms p99": self.gap_ms_p99, "chars/msg": self.chars_per_message, "batch": self.mean_batch}


@dataclass(kw_only=True)
class LongPromptResult(Row):
    """Time to the first character after a long prompt, next to raw batch-1 ingestion of the same prompt."""

    prompt_chars: int
    server_first_char_ms: float
    raw_ingest_ms: float
    repeats: int
    cache_hits: int | None = None  # prefix-state cache hits over the calls (0: all cold); None: unknown

    def cells(self) -> dict[str, Any]:
        return {"1st ms p50": self.server_first_char_ms, "raw ms": self.raw_ingest_ms}


@dataclass(kw_only=True)
class PrefixCacheResult(Row):
    """Time to the first character of a long one-shot prompt: never sent before (the prefix-state cache misses)
    and sent again (a full hit); the hits are the server's own counters over each set of calls."""

    prompt_chars: int
    cold_first_char_ms: float
    warm_first_char_ms: float
    cold_over_warm: float | None
    repeats: int
    cold_hits: int | None  # None: the metrics endpoint did not say
    warm_hits: int | None
    skipped_chars: int | None

    def cells(self) -> dict[str, Any]:
        return {"cold ms": self.cold_first_char_ms, "warm ms": self.warm_first_char_ms,
                "cold/warm": self.cold_over_warm}


@dataclass(kw_only=True)
class SessionStoreResult(Row):
    """One session call at a time on one session (Generate, 1 character), and CreateSession, with one store."""

    store: str  # "memory" or the Redis URL
    calls: int
    call_ms_p50: float
    call_ms_p99: float
    creates: int
    create_ms_p50: float

    def cells(self) -> dict[str, Any]:
        return {"call ms p50": self.call_ms_p50, "call ms p99": self.call_ms_p99, "create ms": self.create_ms_p50}


@dataclass(kw_only=True)
class IdleSessionsResult(Row):
    """`sessions` sessions created on the Redis-backed server and left idle: what they hold in Redis and the server."""

    sessions: int
    seconds: float  # to create them all
    redis_used_memory_before: int
    redis_used_memory_after: int
    redis_bytes_per_session: float
    server_rss_before: int | None
    server_rss_after: int | None

    def cells(self) -> dict[str, Any]:
        after = self.server_rss_after
        return {"B/session": self.redis_bytes_per_session, "redis MB": self.redis_used_memory_after / 2**20,
                "RSS MB": None if after is None else after / 2**20}


@dataclass
class Ratio:
    name: str
    value: float | None
    op: str  # ">=" or "<="
    target: float

    @property
    def met(self) -> bool | None:
        if self.value is None or math.isnan(self.value):
            return None
        return self.value >= self.target if self.op == ">=" else self.value <= self.target


@dataclass
class Report:
    settings: dict[str, Any]
    machine: dict[str, Any]
    rows: list[Row] = field(default_factory=list)
    ratios: list[Ratio] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(row.status != "failed" for row in self.rows)

    def to_json(self) -> dict[str, Any]:
        rows = [{"kind": type(row).__name__, **asdict(row)} for row in self.rows]
        ratios = [{**asdict(ratio), "met": ratio.met} for ratio in self.ratios]
        return {"schema": SCHEMA, "ok": self.ok, "settings": self.settings, "machine": self.machine,
                "rows": rows, "ratios": ratios}


# "1st": time to the first character; "batch": the server's mean batch size; "raw ms": row 7's raw ingestion;
# "cold"/"warm": row 9's first character on a cache miss / hit; "call": row 10's session call; "B/session": row
# 11's Redis memory per idle session, "redis MB" and "RSS MB" after them.
COLUMNS = ("chars/s", "step ms", "1st ms p50", "1st ms p99", "gap ms p50", "gap ms p99", "chars/msg", "batch",
           "raw ms", "cold ms", "warm ms", "cold/warm", "call ms p50", "call ms p99", "create ms", "B/session",
           "redis MB", "RSS MB")
# Rows from these numbers on (sessions and state; the ceiling model) print as tables of their own, so that no
# table carries another's empty columns.
SECOND_TABLE_FROM = 9
THIRD_TABLE_FROM = 12


def _format(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def _print_table(rows: Sequence[Row], width: int, out: TextIO) -> None:
    """A header, then one line per row with the columns any of these rows has."""
    used = [c for c in COLUMNS if any(c in row.cells() for row in rows)]
    print(f"{'#':>2} {'row':<{width}} " + " ".join(f"{c:>{max(9, len(c))}}" for c in used) + "  notes", file=out)
    for row in rows:
        cells = row.cells()
        text = " ".join(f"{_format(cells.get(c)):>{max(9, len(c))}}" for c in used)
        note = row.note if row.status == "ok" else f"{row.status.upper()}: {row.note}"
        print(f"{row.row:>2} {row.title:<{width}} {text}  {note}".rstrip(), file=out)


def print_report(report: Report, out: TextIO) -> None:
    """The tables (one line per row), then the ratios and the machine."""
    width = max([len(row.title) for row in report.rows] + [4])
    tables = ([row for row in report.rows if row.row < SECOND_TABLE_FROM],
              [row for row in report.rows if SECOND_TABLE_FROM <= row.row < THIRD_TABLE_FROM],
              [row for row in report.rows if row.row >= THIRD_TABLE_FROM])
    for number, rows in enumerate(table for table in tables if table):
        if number:
            print(file=out)
        _print_table(rows, width, out)
    if report.ratios:  # none when rows 1-11 were skipped
        print("\nratios (targets):", file=out)
    for ratio in report.ratios:
        verdict = {True: "met", False: "NOT met", None: "n/a"}[ratio.met]
        value = "n/a" if ratio.value is None else f"{ratio.value:.3f}"
        print(f"  {ratio.name:<52} {value:>7}  target {ratio.op} {ratio.target}  {verdict}", file=out)
    print("\nmachine (row 8):", file=out)
    for key, value in report.machine.items():
        shown = json.dumps(value, ensure_ascii=False) if isinstance(value, (dict, list)) else value
        print(f"  {key:<22} {shown}", file=out)


def write_json(report: Report, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(clean_floats(report.to_json()), indent=2, ensure_ascii=False, allow_nan=False)
    path.write_text(text + "\n", encoding="utf-8")


def clean_floats(value: Any) -> Any:
    """NaN and infinity -> None, recursively (JSON has neither)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: clean_floats(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean_floats(v) for v in value]
    return value


def ratio_of(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator or math.isnan(numerator) or math.isnan(denominator):
        return None
    return numerator / denominator


def find(rows: Sequence[Row], row_id: str) -> Row | None:
    return next((row for row in rows if row.id == row_id and row.status == "ok"), None)
