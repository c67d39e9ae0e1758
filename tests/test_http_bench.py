"""charstream-bench row 13 (--http-streams N): SSE streams over HTTP beside gRPC streams on one real
server process, on the tiny model; the row is only in a run that asks for it."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

from server.bench import bench, http_rows
from server.bench.args import build_parser, expected_rows, server_flags
from server.bench.results import Report, print_report, write_json


def test_the_row_is_in_a_run_unless_http_streams_is_0() -> None:
    parser = build_parser()
    assert expected_rows(parser.parse_args(["--model", "m"]))[http_rows.ROW_ID] == (
        13, "server, 64 HTTP SSE + 64 gRPC streams")  # the default
    assert http_rows.ROW_ID not in expected_rows(parser.parse_args(["--model", "m", "--http-streams", "0"]))
    rows = expected_rows(parser.parse_args(["--model", "m", "--http-streams", "8"]))
    assert rows[http_rows.ROW_ID] == (13, "server, 8 HTTP SSE + 8 gRPC streams")


def test_http_and_grpc_streams_side_by_side_give_the_same_texts(tiny_model_dir: Path, tmp_path: Path) -> None:
    args = build_parser().parse_args(["--model", str(tiny_model_dir), "--http-streams", "4", "--chars", "60",
                                      "--device", "cpu", "--timeout", "60"])
    run = bench.Bench(args, sys.stderr)
    report = Report(settings={}, machine={})
    http_rows.run_http_row(run, server_flags(args), lambda flags, serve, row_ids: bench.serve_rows(
        run, flags, serve, row_ids, report.machine))
    [row] = run.rows
    assert row.status == "ok", row.note
    assert isinstance(row, http_rows.HttpBesideGrpcResult) and row.identical_texts
    assert row.http_chars_per_s > 0 and row.grpc_chars_per_s > 0 and row.streams == 4 and row.chars_per_stream == 60
    assert row.server_flags == ["--device", "cpu", "--http-port", "0"]
    report.rows = run.rows
    printed = io.StringIO()
    print_report(report, printed)
    assert "13 server, 4 HTTP SSE + 4 gRPC streams" in printed.getvalue() and "HTTP " in printed.getvalue()
    write_json(report, tmp_path / "bench.json")
    saved = json.loads((tmp_path / "bench.json").read_text())["rows"][0]
    assert saved["kind"] == "HttpBesideGrpcResult" and saved["identical_texts"] is True
