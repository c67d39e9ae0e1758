"""charstream-bench: the server against the raw model it serves, every row in one run.

    charstream-bench --model MODEL_DIR [--checkpoint CKPT_DIR] [--json PATH]
    python -m server.bench.bench --model MODEL_DIR ...

Starts `python -m server` on 127.0.0.1 (a separate process; the clients run in
this one, over grpc.aio), reads GetModelInfo, and measures:

  1  raw ONNX Runtime step loop at batch 1, on the file, provider and thread settings the server uses
     (rows 1 and 4 are measured alternately, --repeats times, and report their median runs)
  2  the same raw loop at each --batch (the batch row 5 is read against: alternately with row 5,
     --streams-repeats times, medians; turns.py)
  3  a naive PyTorch eager loop, one stream (needs --checkpoint and torch; skipped otherwise)
  4  the server, 1 streaming client: chars/s, time to first character
  5  the server, --streams streaming clients: chars/s, chars per message, gaps, first character
  6  row 5 against a second server started with --max-batch 1
  7  a --long-prompt character prompt: time to first character vs raw batch-1 ingestion (a new prompt each time)
  8  the machine, provider, variant, the server's thread settings and lookahead
  9-11  prefix-state cache cold vs warm; a session call, in-process store vs Redis; idle sessions (sessions.py)
 12  the server pipeline's ceiling: row 5 and a raw loop on a tiny model built here, per --ceiling-streams N
     (ceiling.py; --skip-standard-rows measures only this row)
 13  --http-streams N (default 64): N SSE streams over HTTP beside N gRPC streams on one server (http_rows.py)

Rows 5, 6 and 12 run their clients in --client-processes processes, started together (spread.py).

prints the table and the target ratios, and writes it all as JSON (--json).
Servers are always terminated, Ctrl-C included. See server/README.md#benchmark.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence, TextIO

import grpc
import onnxruntime as ort

from protos.charstream.v1 import generator_pb2 as pb
from server.bench import ceiling, clients, http_rows, sessions, spread
from server.bench.args import (
    batches,
    build_parser,
    expected_rows,
    paired_batch,
    server_flags,
)
from server.bench.context import Measure
from server.bench.process import (
    ServerProcess,
    describe_server,
    machine_info,
    running_server,
)
from server.bench.raw import load_cell, raw_ingest_seconds, raw_loop, torch_loop
from server.bench.results import (
    LongPromptResult,
    NoteRow,
    Ratio,
    Report,
    Row,
    StreamsResult,
    find,
    print_report,
    ratio_of,
    write_json,
)
from server.bench.turns import rows_in_turns
from server.engine.model.model_contract import CUDA

PROMPT_CHARS = clients.PROMPT_CHARS
# Rows whose clients spread over --client-processes (row 4's one stream, and the warm-ups, stay in this process).
SPREAD_ROW_IDS = ("server_streams", "server_streams_max_batch_1")
# The server's default --max-sessions (server/config.py, not imported: it would load the whole engine here).
SERVER_MAX_SESSIONS = 1024


@dataclass
class Bench:
    args: argparse.Namespace
    log: TextIO
    info: pb.GetModelInfoResponse | None = None
    cell: ort.InferenceSession | None = None
    rows: list[Row] = field(default_factory=list)  # every row measured, skipped or failed so far

    def attempt(self, row_id: str, measure: Measure) -> None:
        """Run one row; a failure (timeout, RPC error, ...) becomes a failed row saying why."""
        row, title = expected_rows(self.args)[row_id]
        print(f"row {row}: {title} ...", file=self.log, flush=True)
        started = time.monotonic()
        try:
            self.rows.append(measure(row, row_id, title))
        except Exception as exc:  # noqa: BLE001 - one broken row must not lose the others
            self.note(row_id, "failed", self.describe(exc))
        print(f"row {row}: {self.rows[-1].status} in {time.monotonic() - started:.1f} s", file=self.log, flush=True)

    def note(self, row_id: str, status: str, why: str) -> None:
        """A row that was skipped or failed, saying why."""
        row, title = expected_rows(self.args)[row_id]
        self.rows.append(NoteRow(row=row, id=row_id, title=title, status=status, note=why))

    def fail_unmeasured(self, row_ids: Sequence[str], exc: Exception) -> None:
        """Fail, with `exc`'s reason, each of `row_ids` that has no row yet (a server or set-up step failed)."""
        done = {row.id for row in self.rows}
        for row_id in row_ids:
            if row_id not in done:
                self.note(row_id, "failed", self.describe(exc))

    def describe(self, exc: Exception) -> str:
        """One line saying why a row failed."""
        if isinstance(exc, TimeoutError) and not str(exc):
            return f"TimeoutError: no result within --timeout {self.args.timeout:g} s"
        if isinstance(exc, grpc.RpcError) and hasattr(exc, "code"):
            return f"RPC failed: {exc.code().name}: {exc.details()}"  # type: ignore[attr-defined]
        return f"{type(exc).__name__}: {exc}".splitlines()[0]

    def deadline(self) -> float:
        return time.monotonic() + self.args.timeout

    @property
    def prompt(self) -> str:
        return clients.bench_prompt(self.info.vocabulary)  # type: ignore[union-attr]

    def raw_row(self, batch: int) -> None:
        self.attempt(f"raw_batch_{batch}", lambda row, row_id, title: raw_loop(
            self.cell, batch, self.args.chars, self.deadline(), row_id=row_id, title=title, row=row))

    def torch_row(self) -> None:
        if not self.args.checkpoint:
            return self.note("torch_eager", "skipped", "no --checkpoint given")
        try:
            import torch  # noqa: F401
        except ImportError:
            return self.note("torch_eager", "skipped", "torch is not installed")
        use_cuda = self.info.execution_provider == CUDA  # type: ignore[union-attr]
        self.attempt("torch_eager", lambda row, row_id, title: torch_loop(
            self.args.checkpoint, self.args.chars, self.deadline(), use_cuda, row_id=row_id, title=title, row=row))

    def row_number(self, row_id: str) -> int:
        return expected_rows(self.args)[row_id][0]

    def streams_row(self, server: ServerProcess, row_id: str, streams: int) -> None:
        self.attempt(row_id, lambda row, row_id, title: self.streams_result(server, streams, row, row_id, title))

    def streams_result(self, server: ServerProcess, streams: int, row: int, row_id: str, title: str) -> StreamsResult:
        """`streams` one-shot streams of --chars characters, measured once (rows 5 and 6: clients spread)."""
        processes = spread.client_processes(self.args.client_processes, streams) if row_id in SPREAD_ROW_IDS else 1
        return spread.measure_streams(server, self.prompt, streams, self.args.chars, processes, self.args.timeout,
                                      row=row, row_id=row_id, title=title)

    def long_prompt_row(self, server: ServerProcess) -> None:
        def measure(row: int, row_id: str, title: str) -> LongPromptResult:
            length, repeats = self.args.long_prompt, sessions.LONG_PROMPT_REPEATS
            vocab = "".join(self.info.vocabulary)  # type: ignore[union-attr]
            # A new prompt each repeat: a repeated one would be served by the prefix-state cache, not ingested.
            firsts, raws, deadline = [], [], self.deadline()
            before = sessions.cache_counts(server)
            for seed, prompt in enumerate(sessions.distinct_prompts(vocab, length, repeats)):
                call = clients.run_streams(server.address, prompt, 1, self.args.chars, 1000 + seed)
                firsts.append(clients.bounded(call, deadline - time.monotonic()).streams[0].first_char_s)
                tokens = [vocab.index(c) for c in prompt]
                raws.append(raw_ingest_seconds(self.cell, tokens, deadline))  # type: ignore[arg-type]
            hits, _ = sessions.hits_between(before, sessions.cache_counts(server))
            cold = f"; {hits} prefix-cache hits: not cold ingestion" if hits else ""
            return LongPromptResult(row=row, id=row_id, title=title, prompt_chars=length, cache_hits=hits,
                                    server_first_char_ms=statistics.median(firsts) * 1000,
                                    raw_ingest_ms=statistics.median(raws) * 1000, repeats=repeats,
                                    status="failed" if hits else "ok", note=f"medians of {repeats}{cold}")
        self.attempt("long_prompt", measure)

    def warm_up(self, server: ServerProcess) -> None:
        """A few characters on every stream first: connections, ONNX Runtime allocations."""
        clients.bounded(clients.run_streams(server.address, self.prompt, self.args.streams, 8, 10**6),
                        self.args.timeout)

    def first_server(self, server: ServerProcess) -> None:
        """Rows 1-5, 7, 9 and 10 (in-process store), all against (or configured from) the first server."""
        self.info = clients.model_info(server.address, self.args.timeout)
        path = Path(self.args.model) / self.info.model_file
        self.cell = load_cell(path, self.info.execution_provider, server.settings())
        paired = paired_batch(self.args)
        for batch in batches(self.args)[1:]:
            if batch != paired:
                self.raw_row(batch)
        self.torch_row()
        self.warm_up(server)
        rows_in_turns(self, server, 1, 1, self.args.repeats, "raw_batch_1", "server_1_stream")
        if paired is None:
            self.streams_row(server, "server_streams", self.args.streams)
        else:  # rows 2 and 5, in turns
            rows_in_turns(self, server, paired, self.args.streams, self.args.streams_repeats, f"raw_batch_{paired}",
                          "server_streams")
        if self.args.long_prompt > 0:
            self.long_prompt_row(server)
        sessions.first_server_rows(self, server)

    def second_server(self, server: ServerProcess) -> None:
        """Row 6: the same streams against a server that steps one session at a time."""
        self.info = self.info or clients.model_info(server.address, self.args.timeout)
        self.warm_up(server)
        self.streams_row(server, "server_streams_max_batch_1", self.args.streams)


def target_ratios(rows: list[Row], args: argparse.Namespace) -> list[Ratio]:
    """The ratios the targets are stated in (server/README.md#benchmark)."""
    if args.skip_standard_rows:
        return []  # their rows were not measured
    batch = paired_batch(args) or 1

    def rate(row_id: str) -> float | None:
        return getattr(find(rows, row_id), "chars_per_s", None)

    long = find(rows, "long_prompt")
    long_ratio = ratio_of(long.server_first_char_ms, long.raw_ingest_ms) if long else None  # type: ignore[attr-defined]
    return [Ratio("row 4 / row 1: server 1 stream / raw batch 1", ratio_of(rate("server_1_stream"),
                                                                          rate("raw_batch_1")), ">=", 0.8),
            Ratio(f"row 5 / row 2: server {args.streams} streams / raw batch {batch}",
                  ratio_of(rate("server_streams"), rate(f"raw_batch_{batch}")), ">=", 0.7),
            Ratio("row 7: server first char / raw ingestion", long_ratio, "<=", 1.2)]


def serve_rows(bench: Bench, flags: list[str], serve: Callable[[ServerProcess], None], row_ids: list[str],
               machine: dict[str, Any], model: str | None = None) -> None:
    """Rows measured with one server process (on --model unless `model` is given); if the server (or a
    set-up step) fails, the rows not yet measured fail saying why."""
    try:
        with running_server(model or bench.args.model, flags, bench.args.timeout) as server:
            serve(server)
            if bench.info is not None:
                described = describe_server(bench.info, server)
                machine.update({k: v for k, v in described.items() if k not in machine})
    except Exception as exc:  # noqa: BLE001 - reported as failed rows
        print(f"server {' '.join(flags)}: {type(exc).__name__}: {exc}", file=bench.log, flush=True)
        bench.fail_unmeasured(row_ids, exc)


def ceiling_flags(args: argparse.Namespace, streams: int) -> list[str]:
    """Row 12's server: the pass-through flags, fp32 (the one variant the ceiling model has), --max-batch N,
    and room for N sessions where that is more than the server's default."""
    room = {"max_sessions": streams} if streams > SERVER_MAX_SESSIONS else {}
    return server_flags(args, variant="fp32", max_batch=streams, **room)


def standard_rows(bench: Bench, report: Report) -> None:
    """Rows 1-11 and 13: the first server, the --max-batch 1 server, the Redis-backed server, the HTTP one."""
    args = bench.args
    second = "server_streams_max_batch_1"
    first = [row_id for row_id in expected_rows(args)
             if row_id not in (second, http_rows.ROW_ID, *sessions.REDIS_ROW_IDS) and not row_id.startswith("ceiling_")]
    serve_rows(bench, server_flags(args), bench.first_server, first, report.machine)
    serve_rows(bench, server_flags(args, max_batch=1), bench.second_server, [second], report.machine)
    sessions.redis_rows(bench, lambda url, serve, row_ids: serve_rows(
        # A Redis store is served by one process per replica (--frontends serves memory sessions only).
        bench, server_flags(args, session_store=url, frontends=None), serve, row_ids, report.machine))
    http_rows.run_http_row(bench, server_flags(args), lambda flags, serve, row_ids: serve_rows(
        bench, flags, serve, row_ids, report.machine))


def run(args: argparse.Namespace, argv: list[str], log: TextIO) -> Report:
    """Every row; each server (and a private redis-server) is started for its rows and always stopped."""
    bench = Bench(args, log)
    settings = {"argv": argv, "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                **{k: getattr(args, k) for k in ("model", "checkpoint", "streams", "chars", "long_prompt", "timeout",
                                                 "repeats", "streams_repeats", "store_calls", "redis_url", "idle_sessions")},
                "batches": batches(args)[1:], "prompt_chars": PROMPT_CHARS, "temperature": clients.TEMPERATURE,
                "server_flags": server_flags(args), "skip_standard_rows": args.skip_standard_rows,
                "client_processes": spread.client_processes(args.client_processes, args.streams),
                "ceiling_streams": ceiling.ceiling_streams(args)}
    report = Report(settings=settings, machine=machine_info())
    if not args.skip_standard_rows:
        standard_rows(bench, report)
    # The ceiling servers describe the tiny model, not the served one: row 8 is not told about them.
    ceiling.run_ceiling_rows(bench, lambda model, streams, serve, row_ids: serve_rows(
        bench, ceiling_flags(args, streams), serve, row_ids, {}, model=model))
    report.rows = sorted(bench.rows, key=lambda row: row.row)
    report.ratios = target_ratios(report.rows, args)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        sizes = batches(args)
    except ValueError:
        parser.error(f"--batch must be comma-separated integers, got {args.batch!r}")
    if min(args.streams, args.chars, args.repeats, args.streams_repeats, *sizes) < 1 or args.long_prompt < 0 or args.timeout <= 0:
        parser.error("--streams, --chars, --repeats, --streams-repeats and --batch must be >= 1, --long-prompt >= 0, --timeout > 0")
    sessions.check_arguments(parser, args)
    try:
        ceiling.ceiling_streams(args)
    except ValueError:
        parser.error(f"--ceiling-streams must be comma-separated integers >= 0, got {args.ceiling_streams!r}")
    if args.client_processes is not None and args.client_processes < 1:
        parser.error("--client-processes must be >= 1")
    try:
        report = run(args, list(sys.argv[1:] if argv is None else argv), sys.stderr)
    except KeyboardInterrupt:
        print("interrupted; the servers were stopped", file=sys.stderr)
        return 130
    print_report(report, sys.stdout)
    write_json(report, Path(args.json))
    print(f"\nwrote {args.json}", flush=True)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
