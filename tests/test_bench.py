"""charstream-bench against the tiny model, with real server processes: one run of every row, a
server that cannot start, Ctrl-C, and a failure part-way. Its parts without a server are in
tests/test_bench_parts.py."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from server.bench import bench
from server.bench import process as bench_process
from server.bench import sessions as bench_sessions
from server.bench.raw import CPU
from tests.live_processes import pids_with_args

STREAMS, CHARS, LONG_PROMPT, BATCH, STORE_CALLS, IDLE_SESSIONS = 4, 30, 200, 4, 10, 50
ROW_IDS = ["raw_batch_1", "raw_batch_4", "torch_eager", "server_1_stream", "server_streams",
           "server_streams_max_batch_1", "long_prompt", "prefix_cache", "session_store_memory",
           "session_store_redis", "idle_sessions"]
REDIS_ROWS = ["session_store_redis", "idle_sessions"]
HAVE_REDIS = shutil.which("redis-server") is not None
NO_REDIS = "redis-server is not on PATH; install the Debian package redis-server to run this test"


def _record_starts(monkeypatch: pytest.MonkeyPatch, servers: list, redises: list) -> None:
    """Every server process (and redis-server process) the bench starts goes to `servers` (`redises`)."""
    start, start_redis = bench_process._start, bench_process._start_redis

    def recording(*args, **kwargs):  # type: ignore[no-untyped-def]
        servers.append(start(*args, **kwargs))
        return servers[-1]

    def recording_redis(*args, **kwargs):  # type: ignore[no-untyped-def]
        process, port = start_redis(*args, **kwargs)
        redises.append(process)
        return process, port

    monkeypatch.setattr(bench_process, "_start", recording)
    monkeypatch.setattr(bench_process, "_start_redis", recording_redis)


@pytest.fixture
def started_redis(monkeypatch: pytest.MonkeyPatch) -> tuple[list[bench_process.ServerProcess], list]:
    """Every server process, and every redis-server process, the bench starts."""
    servers: list[bench_process.ServerProcess] = []
    redises: list = []
    _record_starts(monkeypatch, servers, redises)
    return servers, redises


@pytest.fixture
def started(started_redis: tuple[list, list]) -> list[bench_process.ServerProcess]:
    return started_redis[0]


def _server_pids(model_dir: Path) -> list[int]:
    """Live `python -m server --model model_dir` processes on this machine."""
    return pids_with_args("server", str(model_dir))


def _argv(model_dir: Path, json_path: Path, *extra: str) -> list[str]:
    return ["--model", str(model_dir), "--streams", str(STREAMS), "--chars", str(CHARS), "--long-prompt",
            str(LONG_PROMPT), "--batch", str(BATCH), "--device", "cpu", "--timeout", "60", "--json", str(json_path),
            "--store-calls", str(STORE_CALLS), "--repeats", "3", "--streams-repeats", "2",
            "--ceiling-streams", "0", "--http-streams", "0", *extra]
    # rows 12 and 13 have tests of their own (tests/test_bench_spread.py, tests/test_http_bench.py)


def _assert_servers_gone(servers: list[bench_process.ServerProcess], model_dir: Path, redises: list = ()) -> None:
    assert servers, "the bench started no server"
    assert all(server.process.poll() is not None for server in servers)
    assert all(redis.poll() is not None for redis in redises)
    if Path("/proc/self/cmdline").exists():
        assert _server_pids(model_dir) == []


@pytest.fixture(scope="module")
def full_run(tiny_model_dir: Path, tiny_checkpoint: Path,
             tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One run of every row (rows 9-11 with small settings), shared by the tests that check its rows."""
    json_path = tmp_path_factory.mktemp("full_run") / "bench.json"
    servers: list[bench_process.ServerProcess] = []
    redises: list = []
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as monkeypatch, contextlib.redirect_stdout(out):
        _record_starts(monkeypatch, servers, redises)
        code = bench.main(_argv(tiny_model_dir, json_path, "--checkpoint", str(tiny_checkpoint),
                                "--idle-sessions", str(IDLE_SESSIONS)))
    data = json.loads(json_path.read_text(encoding="utf-8"))
    return {"code": code, "printed": out.getvalue(), "data": data, "servers": servers, "redises": redises,
            "rows": {row["id"]: row for row in data["rows"]}}


def test_every_row_against_the_tiny_model(full_run: dict[str, Any], tiny_model_dir: Path) -> None:
    printed, data, rows = full_run["printed"], full_run["data"], full_run["rows"]
    assert full_run["code"] == 0, printed
    assert data["schema"] == "charstream-bench/1" and data["ok"] is True
    assert [row["id"] for row in data["rows"]] == ROW_IDS
    assert [row["row"] for row in data["rows"]] == [1, 2, 3, 4, 5, 6, 7, 9, 10, 10, 11]
    wanted = {row_id: "skipped" if row_id in REDIS_ROWS and not HAVE_REDIS else "ok" for row_id in ROW_IDS}
    assert {row_id: row["status"] for row_id, row in rows.items()} == wanted, rows
    assert "median of 3 runs, in turns with row 4" in rows["raw_batch_1"]["note"]
    assert "median of 3 runs, in turns with row 1" in rows["server_1_stream"]["note"]
    assert "median of 2 runs, in turns with row 5" in rows["raw_batch_4"]["note"]  # --streams is one of --batch
    assert "median of 2 runs, in turns with row 2" in rows["server_streams"]["note"]
    for row_id, batch in (("raw_batch_1", 1), ("raw_batch_4", BATCH)):
        assert rows[row_id]["batch"] == batch and rows[row_id]["steps"] == CHARS
        assert rows[row_id]["chars_per_s"] > 0 and rows[row_id]["provider"] == CPU
    assert rows["torch_eager"]["chars_per_s"] > 0 and rows["torch_eager"]["device"] == "cpu"
    for row_id, streams in (("server_1_stream", 1), ("server_streams", STREAMS), ("server_streams_max_batch_1", STREAMS)):
        row = rows[row_id]
        assert row["streams"] == streams and row["total_chars"] == streams * CHARS
        assert row["chars_per_s"] > 0 and 1 <= row["chars_per_message"] <= CHARS
        assert 0 < row["first_char_ms_p50"] <= row["first_char_ms_p99"] < 60_000
        if row["messages"] > streams:  # a gap needs a stream with two messages; a fast machine may send one
            assert 0 < row["gap_ms_p50"] <= row["gap_ms_p99"] < 60_000
        else:
            assert row["gap_ms_p50"] is None and row["gap_ms_p99"] is None
        assert row["chars_per_message"] == pytest.approx(row["total_chars"] / row["messages"])
    assert rows["server_streams"]["server_flags"] == ["--device", "cpu"]
    assert rows["server_streams_max_batch_1"]["server_flags"] == ["--device", "cpu", "--max-batch", "1"]
    assert rows["server_streams_max_batch_1"]["mean_batch"] == 1.0  # from the server's own batch-size metric
    long = rows["long_prompt"]
    assert long["prompt_chars"] == LONG_PROMPT and long["server_first_char_ms"] > 0 and long["raw_ingest_ms"] > 0
    assert long["cache_hits"] == 0, "row 7's repeats must be ingested, not served by the prefix cache"
    machine = data["machine"]
    assert machine["os_cpu_count"] == os.cpu_count() and machine["cpu_model"]
    assert machine["execution_provider"] == CPU and machine["variant"] == "fp32"
    assert machine["model_file"] == "model.onnx"
    # As the server logged them at start-up: its defaults, and the flags the bench gave it.
    settings = machine["server_settings"]
    assert (settings["device"], settings["variant"]) == ("cpu", "fp32")
    assert settings["lookahead"] == machine["lookahead_chars"]
    assert (settings["intra_op_threads"], settings["allow_spinning"]) == (1, False)
    assert len(data["ratios"]) == 3 and all(r["value"] > 0 for r in data["ratios"])
    for title in ("raw ONNX Runtime loop, batch 1", "server, 4 streams", "server --max-batch 1", "ratios",
                  "prefix cache", "session store memory", "idle sessions", "cold/warm", "call ms p50"):
        assert title in printed
    _assert_servers_gone(full_run["servers"], tiny_model_dir, full_run["redises"])


def test_a_server_that_cannot_start_fails_its_rows_and_is_reported(tiny_model_dir: Path, tmp_path: Path,
                                                                    started_redis: tuple[list, list]) -> None:
    json_path = tmp_path / "bench.json"
    assert bench.main(_argv(tiny_model_dir, json_path, "--variant", "no-such-variant")) == 1
    data = json.loads(json_path.read_text(encoding="utf-8"))
    assert data["ok"] is False
    skipped = {"idle_sessions"} | (set() if HAVE_REDIS else {"session_store_redis"})
    assert {row["id"]: row["status"] for row in data["rows"]} == {
        i: "skipped" if i in skipped else "failed" for i in ROW_IDS}
    failed = [row for row in data["rows"] if row["status"] == "failed"]
    assert all("no-such-variant" in row["note"] and "ServerStartError" in row["note"] for row in failed)
    assert _server_pids(tiny_model_dir) == []
    assert all(redis.poll() is not None for redis in started_redis[1])


def test_ctrl_c_stops_the_servers(tiny_model_dir: Path, tmp_path: Path, started: list,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise KeyboardInterrupt

    monkeypatch.setattr(bench.Bench, "streams_row", interrupted)
    assert bench.main(_argv(tiny_model_dir, tmp_path / "bench.json")) == 130
    assert not (tmp_path / "bench.json").exists()
    _assert_servers_gone(started, tiny_model_dir)


def test_rows_measured_before_a_failure_are_kept(tiny_model_dir: Path, tmp_path: Path, started: list,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise RuntimeError("warm-up broke")

    monkeypatch.setattr(bench.Bench, "warm_up", broken)
    json_path = tmp_path / "bench.json"
    argv = _argv(tiny_model_dir, json_path, "--batch", f"{BATCH},2")
    assert bench.main(argv) == 1
    data = json.loads(json_path.read_text(encoding="utf-8"))
    statuses = {row["id"]: (row["status"], row["note"]) for row in data["rows"]}
    assert statuses["raw_batch_2"][0] == "ok"  # a raw batch no server row is read against: measured first
    assert statuses["torch_eager"] == ("skipped", "no --checkpoint given")
    # Rows 1 and 2 are measured in turns with rows 4 and 5, after the warm-up.
    for row_id in ["raw_batch_1", "raw_batch_4", *ROW_IDS[3:9]]:
        assert statuses[row_id] == ("failed", "RuntimeError: warm-up broke")
    # The Redis-backed server needs no warm-up: its row is measured all the same.
    assert statuses["session_store_redis"][0] == ("ok" if HAVE_REDIS else "skipped")
    assert statuses["idle_sessions"] == ("skipped", "give --idle-sessions N to measure")
    assert data["settings"]["argv"] == argv
    _assert_servers_gone(started, tiny_model_dir)


def test_row_9_warm_calls_hit_the_prefix_cache_and_cold_ones_do_not(full_run: dict[str, Any]) -> None:
    row = full_run["rows"]["prefix_cache"]
    assert row["status"] == "ok" and row["row"] == 9 and row["prompt_chars"] == LONG_PROMPT
    assert row["warm_hits"] == row["repeats"] == bench_sessions.PREFIX_REPEATS and row["cold_hits"] == 0
    assert row["skipped_chars"] == bench_sessions.PREFIX_REPEATS * LONG_PROMPT
    assert row["cold_first_char_ms"] > 0 and row["warm_first_char_ms"] > 0
    assert row["cold_over_warm"] == pytest.approx(row["cold_first_char_ms"] / row["warm_first_char_ms"])
    assert "warm hits 3/3" in row["note"]


def _assert_store_row(row: dict[str, Any]) -> None:
    assert row["status"] == "ok" and row["row"] == 10
    assert row["calls"] == STORE_CALLS and row["creates"] == bench_sessions.CREATES
    assert 0 < row["call_ms_p50"] <= row["call_ms_p99"] < 60_000 and 0 < row["create_ms_p50"] < 60_000


def test_row_10_in_process_store(full_run: dict[str, Any]) -> None:
    row = full_run["rows"]["session_store_memory"]
    _assert_store_row(row)
    assert row["store"] == "memory"


def test_row_10_redis_store_and_row_11_idle_sessions(full_run: dict[str, Any]) -> None:
    if not HAVE_REDIS:
        assert all(bench_sessions.NO_REDIS == full_run["rows"][i]["note"] for i in REDIS_ROWS)
        pytest.skip(NO_REDIS)
    row = full_run["rows"]["session_store_redis"]
    _assert_store_row(row)
    assert row["store"].startswith("redis://127.0.0.1:")
    idle = full_run["rows"]["idle_sessions"]
    assert idle["status"] == "ok" and idle["sessions"] == IDLE_SESSIONS and idle["seconds"] > 0
    assert idle["redis_used_memory_after"] > idle["redis_used_memory_before"] > 0
    assert idle["redis_bytes_per_session"] == pytest.approx(
        (idle["redis_used_memory_after"] - idle["redis_used_memory_before"]) / IDLE_SESSIONS)
    assert idle["server_rss_before"] > 0 and idle["server_rss_after"] > 0
    assert len(full_run["redises"]) == 1 and full_run["redises"][0].poll() is not None
