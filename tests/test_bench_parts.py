"""charstream-bench's parts without a server: the flags it passes on, argument checks, the raw ONNX
Runtime loop and its session options, and the table and JSON report."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any

import pytest

from server.bench import bench
from server.bench import turns as bench_turns
from server.bench.raw import (
    CPU,
    WARMUP_STEPS,
    load_cell,
    raw_ingest_seconds,
    raw_loop,
    session_options,
)
from server.bench.results import (
    LongPromptResult,
    NoteRow,
    RawResult,
    Report,
    StreamsResult,
    print_report,
    write_json,
)


def test_only_the_flags_given_are_passed_to_the_server() -> None:
    parser = bench.build_parser()
    assert bench.server_flags(parser.parse_args(["--model", "m"])) == []
    args = parser.parse_args(["--model", "m", "--variant", "int8", "--intra-op-threads", "2", "--no-allow-spinning",
                              "--lookahead", "8", "--max-batch", "32"])
    assert bench.server_flags(args) == ["--variant", "int8", "--intra-op-threads", "2", "--no-allow-spinning",
                                        "--lookahead", "8", "--max-batch", "32"]
    assert bench.server_flags(parser.parse_args(["--model", "m", "--allow-spinning"]), max_batch=1) == [
        "--allow-spinning", "--max-batch", "1"]


def test_bad_arguments_are_refused() -> None:
    for argv in (["--batch", "x"], ["--streams", "0"], ["--long-prompt", "-1"], ["--streams-repeats", "0"]):
        with pytest.raises(SystemExit) as exit_info:
            bench.main(["--model", "m", *argv])
        assert exit_info.value.code == 2


def test_raw_loop_steps_the_served_file_with_the_server_thread_settings(tiny_model_dir: Path) -> None:
    settings = {"intra_op_threads": 1, "allow_spinning": False}
    options = session_options(settings)
    assert options.intra_op_num_threads == 1
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    cell = Recording(load_cell(tiny_model_dir / "model.onnx", CPU, settings))
    result = raw_loop(cell, 3, 20, deadline=math.inf, row=2, row_id="raw_batch_3", title="raw, batch 3")
    # Really 20 timed steps (after the warm-up) of 3 streams, each fed its argmax and its state back.
    assert len(cell.calls) == WARMUP_STEPS + 20 and result.provider == CPU
    assert [feeds["token_ids"].tolist() for feeds, _ in cell.calls[:1]] == [[0, 1, 2]]
    for (_, (logits, hidden)), (feeds, _) in zip(cell.calls, cell.calls[1:]):
        assert feeds["token_ids"].tolist() == logits.argmax(axis=1).tolist() and feeds["hidden"] is hidden
    assert result.chars_per_s == pytest.approx(60 / result.seconds) and result.step_ms > 0
    cell.calls.clear()
    assert raw_ingest_seconds(cell, [0, 1, 2, 3], deadline=math.inf) > 0
    assert [feeds["token_ids"].tolist() for feeds, _ in cell.calls] == [[0], [1], [2], [3]]  # the prompt, in order
    assert all(feeds["hidden"] is hidden for (feeds, _), (_, (_, hidden)) in zip(cell.calls[1:], cell.calls))


class Recording:
    """An ONNX Runtime session that notes every run's inputs and outputs."""

    def __init__(self, session: Any) -> None:
        self.session, self.calls = session, []  # type: ignore[var-annotated]

    def run(self, names: Any, feeds: dict[str, Any]) -> Any:
        outputs = self.session.run(names, feeds)
        self.calls.append((feeds, outputs))
        return outputs

    def __getattr__(self, name: str) -> Any:
        return getattr(self.session, name)


def test_table_and_json_show_every_row_and_turn_nan_into_null(tmp_path: Path) -> None:
    raw = RawResult(row=1, id="raw_batch_1", title="raw, batch 1", batch=1, steps=10, seconds=0.01,
                    chars_per_s=1000.0, step_ms=1.0, provider=CPU)
    streams = StreamsResult(row=5, id="server_streams", title="server, 2 streams", streams=2, chars_per_stream=5,
                            total_chars=10, messages=4, seconds=0.02, chars_per_s=500.0, chars_per_message=2.5,
                            first_char_ms_p50=1.0, first_char_ms_p99=2.0, gap_ms_p50=math.nan, gap_ms_p99=math.nan,
                            mean_batch=None)
    long = LongPromptResult(row=7, id="long_prompt", title="long", prompt_chars=9, server_first_char_ms=3.0,
                            raw_ingest_ms=2.0, repeats=3)
    failed = NoteRow(row=3, id="torch_eager", title="torch", status="failed", note="RowTimeout: after 3 steps")
    report = Report(settings={"streams": 2}, machine={"cpu_model": "x"}, rows=[raw, failed, streams, long])
    args = bench.build_parser().parse_args(["--model", "m", "--streams", "2", "--batch", "2", "--long-prompt", "9"])
    report.ratios = bench.target_ratios(report.rows, args)
    assert [r.value for r in report.ratios] == [None, None, 1.5]
    assert [r.met for r in report.ratios] == [None, None, False]
    out = io.StringIO()
    print_report(report, out)
    text = out.getvalue()
    assert "FAILED: RowTimeout" in text and "server, 2 streams" in text and "NOT met" in text
    write_json(report, tmp_path / "deep" / "bench.json")
    data = json.loads((tmp_path / "deep" / "bench.json").read_text(encoding="utf-8"))
    assert data["ok"] is False and [row["kind"] for row in data["rows"]] == [
        "RawResult", "NoteRow", "StreamsResult", "LongPromptResult"]
    assert data["rows"][2]["gap_ms_p50"] is None and data["ratios"][2] == {
        "name": "row 7: server first char / raw ingestion", "value": 1.5, "op": "<=", "target": 1.2, "met": False}


@pytest.mark.parametrize("threads, spinning", [(1, False), (2, True), (0, False)])
def test_raw_loop_session_options_match_the_servers(threads: int, spinning: bool) -> None:
    """The raw loop must run the cell as the server does; this fails if the server's options drift."""
    from server.engine.model.providers import ThreadSettings
    from server.engine.model.providers import session_options as server_session_options

    ours = session_options({"intra_op_threads": threads, "allow_spinning": spinning})
    theirs = server_session_options(ThreadSettings(intra_op_threads=threads, allow_spinning=spinning))
    assert ours.intra_op_num_threads == theirs.intra_op_num_threads
    assert ours.inter_op_num_threads == theirs.inter_op_num_threads
    assert ours.graph_optimization_level == theirs.graph_optimization_level
    assert ours.execution_mode == theirs.execution_mode
    key = "session.intra_op.allow_spinning"
    assert ours.get_session_config_entry(key) == theirs.get_session_config_entry(key)



def _raw(chars_per_s: float) -> RawResult:
    return RawResult(row=1, id="raw_batch_1", title="raw", batch=1, steps=10, seconds=10 / chars_per_s,
                     chars_per_s=chars_per_s, step_ms=1000 / chars_per_s, provider=CPU)


def test_rows_in_turns_report_their_median_runs_or_fail_together(monkeypatch: pytest.MonkeyPatch) -> None:
    """Measured in turns; each row is the run in the middle, its note the spread. A failure in
    any turn fails both rows with it."""
    speeds = iter([300.0, 100.0, 200.0])
    monkeypatch.setattr(bench_turns, "raw_loop", lambda *args, **kwargs: _raw(next(speeds)))
    streamed = iter([_raw(9.0), _raw(7.0), _raw(8.0)])  # stand-ins: only chars_per_s is read
    args = bench.build_parser().parse_args(["--model", "m", "--repeats", "3"])
    runner = bench.Bench(args, io.StringIO())
    monkeypatch.setattr(runner, "streams_result", lambda *args: next(streamed))
    bench_turns.rows_in_turns(runner, None, 1, 1, 3, "raw_batch_1", "server_1_stream")  # type: ignore[arg-type]
    by_id = {row.id: row for row in runner.rows}
    assert by_id["raw_batch_1"].chars_per_s == 200.0 and by_id["server_1_stream"].chars_per_s == 8.0
    assert (by_id["server_1_stream"].row, by_id["server_1_stream"].title) == (4, "server, 1 stream")
    assert "median of 3 runs" in by_id["raw_batch_1"].note and "100-300" in by_id["raw_batch_1"].note

    def broken(*args: Any) -> None:
        raise TimeoutError("the server stopped answering")

    failing = bench.Bench(args, io.StringIO())
    monkeypatch.setattr(failing, "streams_result", broken)
    monkeypatch.setattr(bench_turns, "raw_loop", lambda *args, **kwargs: _raw(1.0))
    bench_turns.rows_in_turns(failing, None, 1, 1, 3, "raw_batch_1", "server_1_stream")  # type: ignore[arg-type]
    assert [(row.id, row.status) for row in failing.rows] == [("raw_batch_1", "failed"), ("server_1_stream", "failed")]
    assert all("stopped answering" in row.note for row in failing.rows)
