"""charstream-bench's client processes (server/bench/spread.py) and row 12, the ceiling model (ceiling.py):
merging runs and the flags without a server, then a real server on the tiny model over 2 client processes, a
ceiling run end to end, and the bounds (a server that never answers, no torch)."""

from __future__ import annotations

import contextlib
import io
import json
import math
import multiprocessing
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from server.bench import bench, clients, floor_server
from server.bench import ceiling as bench_ceiling
from server.bench import process as bench_process
from server.bench import spread as bench_spread
from server.bench.clients import StreamsRun, StreamStats
from tests.live_processes import pids_with_args

CHARS = 20


def test_shares_are_contiguous_in_stream_order_and_even() -> None:
    assert bench_spread.shares(6, 2) == [(0, 3), (3, 3)]
    assert bench_spread.shares(7, 3) == [(0, 3), (3, 2), (5, 2)]
    assert bench_spread.shares(2, 4) == [(0, 1), (1, 1)]  # never an empty share
    assert bench_spread.shares(5, 1) == [(0, 5)]


def test_default_client_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench_spread.os, "cpu_count", lambda: 16)
    assert bench_spread.default_client_processes(64) == 1
    assert bench_spread.default_client_processes(65) == 4
    monkeypatch.setattr(bench_spread.os, "cpu_count", lambda: 2)
    assert bench_spread.default_client_processes(256) == 2
    assert bench_spread.client_processes(None, 1024) == 2
    assert bench_spread.client_processes(8, 3) == 3  # no more processes than streams
    assert bench_spread.client_processes(1, 1024) == 1


def test_merged_run_spans_the_common_start_to_the_latest_end() -> None:
    first = StreamsRun(2.0, [StreamStats(chars=10, messages=2, first_char_s=0.1, gaps_s=[0.5])], started_at=100.01)
    second = StreamsRun(1.0, [StreamStats(chars=10, messages=1, first_char_s=0.3),
                              StreamStats(chars=4, messages=4, first_char_s=0.2, gaps_s=[0.1, 0.2, 0.3])],
                        started_at=100.02)
    merged = bench_spread.merge_runs([first, second], start=100.0)
    assert merged.seconds == pytest.approx(2.01)  # the first run ends last: 100.01 + 2.0
    assert merged.started_at == 100.0
    assert [s.chars for s in merged.streams] == [10, 10, 4]  # stream order kept: seeds follow it
    assert merged.total_chars == 24 and merged.messages == 7
    assert merged.first_char_ms(50) == pytest.approx(200.0)
    assert merged.gap_ms(100) == pytest.approx(500.0)


def test_ceiling_flags_and_rows() -> None:
    parser = bench.build_parser()
    args = parser.parse_args(["--model", "m", "--ceiling-streams", "4,1024,4,2000", "--variant", "int8",
                              "--intra-op-threads", "1"])
    assert bench_ceiling.ceiling_streams(args) == [4, 1024, 2000]
    assert bench.ceiling_flags(args, 4) == ["--variant", "fp32", "--intra-op-threads", "1", "--max-batch", "4"]
    assert bench.ceiling_flags(args, 2000)[-4:] == ["--max-batch", "2000", "--max-sessions", "2000"]
    from server.config import ServerConfig

    assert bench.SERVER_MAX_SESSIONS == ServerConfig.max_sessions  # the copy in bench.py still says the truth
    rows = bench.expected_rows(args)
    assert [row for row in rows if row.startswith("ceiling_")][-3:] == ["ceiling_raw_2000", "ceiling_streams_2000",
                                                                       "ceiling_floor_2000"]
    assert rows["ceiling_streams_4"] == (12, "ceiling: server, 1x16 GRU, 4 streams")
    assert rows["ceiling_floor_4"] == (12, "ceiling: gRPC alone, no engine, 4 streams")
    skipping = parser.parse_args(["--model", "m", "--skip-standard-rows", "--ceiling-streams", "8"])
    assert list(bench.expected_rows(skipping)) == ["ceiling_raw_8", "ceiling_streams_8", "ceiling_floor_8"]
    assert bench.target_ratios([], skipping) == []
    assert "ceiling_raw_256" in bench.expected_rows(parser.parse_args(["--model", "m"]))  # the default
    assert not any(i.startswith("ceiling") for i in bench.expected_rows(
        parser.parse_args(["--model", "m", "--ceiling-streams", "0"])))


@pytest.mark.parametrize("bad", [["--ceiling-streams", "4,x"], ["--ceiling-streams", "-1"],
                                 ["--client-processes", "0"]])
def test_bad_flags_are_refused(bad: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        bench.main(["--model", "m", *bad])
    assert exited.value.code == 2
    assert bad[0] in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_server(tiny_model_dir: Path) -> Iterator[bench_process.ServerProcess]:
    with bench_process.running_server(str(tiny_model_dir), ["--device", "cpu"], 60) as server:
        yield server


@pytest.fixture(scope="module")
def prompt(tiny_server: bench_process.ServerProcess) -> str:
    return clients.bench_prompt(clients.model_info(tiny_server.address, 30).vocabulary)


def test_streams_over_two_processes_are_the_one_process_streams(tiny_server: bench_process.ServerProcess,
                                                                 prompt: str) -> None:
    streams = 6
    spread = bench_spread.run_spread(tiny_server.address, prompt, streams, CHARS, 1, 2, 30, keep_text=True)
    alone = bench_spread.run_spread(tiny_server.address, prompt, streams, CHARS, 1, 1, 30, keep_text=True)
    assert spread.total_chars == alone.total_chars == streams * CHARS
    assert [s.text for s in spread.streams] == [s.text for s in alone.streams]  # seed 1 + i for stream i
    assert len({s.text for s in spread.streams}) > 1  # distinct seeds, distinct texts
    assert 0 < spread.seconds < 30 and not math.isnan(spread.started_at)
    assert all(0 < s.first_char_s <= spread.seconds for s in spread.streams)
    assert multiprocessing.active_children() == []


def test_rows_5_and_6_record_their_client_processes(tiny_server: bench_process.ServerProcess, prompt: str) -> None:
    result = bench_spread.measure_streams(tiny_server, prompt, 4, CHARS, 2, 30, row=5, row_id="server_streams",
                                          title="server, 4 streams")
    assert result.client_processes == 2 and result.total_chars == 4 * CHARS and result.chars_per_s > 0
    assert result.mean_batch is not None and result.mean_batch >= 1


def test_a_server_that_never_answers_times_out_and_leaves_no_client_process() -> None:
    silent = bench_process.free_port()  # nothing listens there: the children never connect
    with pytest.raises(TimeoutError, match="client processes not ready"):
        bench_spread.run_spread(f"127.0.0.1:{silent}", "ab", 4, CHARS, 1, 2, 4)
    assert multiprocessing.active_children() == []


def test_ctrl_c_while_the_streams_run_leaves_no_client_process(tiny_server: bench_process.ServerProcess,
                                                                prompt: str, monkeypatch: pytest.MonkeyPatch) -> None:
    collect = bench_spread._collect

    def interrupted(children, kind, deadline):  # type: ignore[no-untyped-def]
        if kind == "done":
            raise KeyboardInterrupt
        return collect(children, kind, deadline)

    monkeypatch.setattr(bench_spread, "_collect", interrupted)
    with pytest.raises(KeyboardInterrupt):
        bench_spread.run_spread(tiny_server.address, prompt, 4, 2000, 1, 2, 30)
    assert multiprocessing.active_children() == []


def _ceiling_run(tiny_model_dir: Path, json_path: Path, monkeypatch: pytest.MonkeyPatch, *extra: str) -> int:
    return bench.main(["--model", str(tiny_model_dir), "--device", "cpu", "--skip-standard-rows", "--chars",
                       str(CHARS), "--timeout", "60", "--json", str(json_path), *extra])


def test_the_ceiling_model_is_built_served_and_removed(tiny_model_dir: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    built: list[Path] = []
    served: list[Any] = []
    build, measure = bench_ceiling.ceiling_model, bench_ceiling.measure_ceiling

    @contextlib.contextmanager
    def recording_build(vocabulary: list[str]) -> Iterator[Path]:
        with build(vocabulary) as model_dir:
            built.append(model_dir)
            yield model_dir

    def recording_measure(bench_, server, model_dir, streams, prompt_):  # type: ignore[no-untyped-def]
        served.append((clients.model_info(server.address, 30), server.flags))
        return measure(bench_, server, model_dir, streams, prompt_)

    monkeypatch.setattr(bench_ceiling, "ceiling_model", recording_build)
    monkeypatch.setattr(bench_ceiling, "measure_ceiling", recording_measure)
    json_path = tmp_path / "bench.json"
    with contextlib.redirect_stdout(io.StringIO()) as out:
        code = _ceiling_run(tiny_model_dir, json_path, monkeypatch, "--ceiling-streams", "4",
                            "--client-processes", "2")
    assert code == 0, out.getvalue()
    data = json.loads(json_path.read_text(encoding="utf-8"))
    rows = {row["id"]: row for row in data["rows"]}
    assert list(rows) == ["ceiling_raw_4", "ceiling_streams_4", "ceiling_floor_4"] and data["ratios"] == []
    raw, streams, floor = rows["ceiling_raw_4"], rows["ceiling_streams_4"], rows["ceiling_floor_4"]
    assert raw["status"] == streams["status"] == floor["status"] == "ok"
    assert raw["row"] == streams["row"] == floor["row"] == 12
    assert raw["batch"] == 4 and raw["steps"] == CHARS and raw["chars_per_s"] > 0
    assert streams["total_chars"] == 4 * CHARS and streams["client_processes"] == 2
    assert streams["server_flags"] == ["--device", "cpu", "--variant", "fp32", "--max-batch", "4"]
    assert "2 client processes" in streams["note"] and "of the raw loop at batch 4" in streams["note"]
    # The floor: the same streams and clients, the server row's mean message size, and the share it leaves.
    size = max(1, round(streams["chars_per_message"]))
    assert floor["total_chars"] == 4 * CHARS and floor["client_processes"] == 2
    assert floor["server_flags"][-2:] == ["--message-chars", str(size)]
    assert floor["messages"] == 4 * len(floor_server.message_sizes(CHARS, size))
    share = streams["chars_per_s"] / floor["chars_per_s"]
    assert f"{size} characters a message (the server row's mean); the server row is {share:.3f}" in floor["note"]
    info, flags = served[0]
    assert flags == streams["server_flags"]
    vocabulary = bench_ceiling.served_vocabulary(tiny_model_dir)
    assert (info.num_layers, info.hidden_size, info.embedding_dim) == (1, 16, 8)
    assert list(info.vocabulary) == vocabulary and info.variant == "fp32"
    assert built and not built[0].exists()  # the temporary model directory is gone
    assert "ceiling: server, 1x16 GRU, 4 streams" in out.getvalue()
    assert multiprocessing.active_children() == []
    assert pids_with_args("server.bench.floor_server") == []  # the floor's server was stopped too


def test_the_ceiling_row_is_skipped_without_torch(tiny_model_dir: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    json_path = tmp_path / "bench.json"
    with contextlib.redirect_stdout(io.StringIO()):
        assert _ceiling_run(tiny_model_dir, json_path, monkeypatch, "--ceiling-streams", "4") == 0
    rows = json.loads(json_path.read_text(encoding="utf-8"))["rows"]
    assert [(row["id"], row["status"]) for row in rows] == [("ceiling_raw_4", "skipped"),
                                                           ("ceiling_streams_4", "skipped"),
                                                           ("ceiling_floor_4", "skipped")]
    assert "torch is not installed" in rows[0]["note"]
