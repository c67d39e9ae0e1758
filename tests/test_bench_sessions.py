"""charstream-bench rows 9-11 (server/bench/sessions.py) in parts: prompts, counters, skips, Ctrl-C, the table.

The rows themselves run against the tiny model in tests/test_bench.py's full run.
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import pytest

from server.bench import bench
from server.bench import process as bench_process
from server.bench import sessions as bench_sessions
from server.bench.results import (
    IdleSessionsResult,
    PrefixCacheResult,
    Report,
    SessionStoreResult,
    print_report,
)
from tests.test_bench import _record_starts

NO_REDIS = "redis-server is not on PATH; install the Debian package redis-server to run this test"
METRICS = """# TYPE charstream_prefix_cache_lookups counter
charstream_prefix_cache_lookups_total{result="hit"} 3.0
charstream_prefix_cache_lookups_total{result="miss"} 7.0
charstream_prefix_cache_skipped_chars_total 600.0
"""


def test_distinct_prompts_are_never_prefixes_of_one_another() -> None:
    vocabulary = "\n ',.:OTWabdefghiklmnoqrstuw"
    for length in (1, 5, 200, 2000):
        row_7 = bench_sessions.distinct_prompts(vocabulary, length, bench_sessions.LONG_PROMPT_REPEATS)
        row_9 = bench_sessions.distinct_prompts(vocabulary, length, bench_sessions.PREFIX_REPEATS,
                                                first=bench_sessions.LONG_PROMPT_REPEATS)
        prompts = row_7 + row_9
        assert len(set(prompts)) == len(prompts) == 6
        assert all(len(p) == length and set(p) <= set(vocabulary) for p in prompts)
        assert not any(a != b and b.startswith(a) for a in prompts for b in prompts)
    assert bench_sessions.distinct_prompts("abc", 7, 2, first=1) == ["bcabcab", "cabcabc"]
    with pytest.raises(ValueError):
        bench_sessions.distinct_prompts("abc", 10, 2, first=2)


def test_prefix_cache_counters_are_read_from_the_metrics_page(monkeypatch: pytest.MonkeyPatch) -> None:
    server = bench_process.ServerProcess(process=None, command=[], flags=[])  # type: ignore[arg-type]
    server.events.append({"event": "listening", "metrics": "127.0.0.1:1"})
    pages = iter([METRICS.replace(" 3.0", " 1.0").replace(" 600.0", " 0.0"), METRICS, "no cache here", None])
    monkeypatch.setattr(bench_sessions, "metrics_text", lambda url: next(pages))
    before, after = bench_sessions.cache_counts(server), bench_sessions.cache_counts(server)
    assert after == bench_sessions.CacheCounts(hits=3.0, misses=7.0, skipped_chars=600.0)
    assert bench_sessions.hits_between(before, after) == (2, 600)
    assert bench_sessions.cache_counts(server) is None and bench_sessions.cache_counts(server) is None
    assert bench_sessions.hits_between(None, after) == (None, None)
    # Before its first lookup the labelled counter has no samples: no hits yet, not unknown.
    monkeypatch.setattr(bench_sessions, "metrics_text", lambda url: METRICS.splitlines()[0])
    assert bench_sessions.cache_counts(server) == (0.0, 0.0, 0.0)


def test_without_redis_server_rows_10_and_11_are_skipped_saying_what_to_install(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench_sessions.shutil, "which", lambda name: None)
    assert "install the Debian package redis-server" in bench_sessions.NO_REDIS
    for idle in ("0", "5"):
        args = bench.build_parser().parse_args(["--model", "m", "--idle-sessions", idle])
        runner = bench.Bench(args, io.StringIO())
        bench_sessions.redis_rows(runner, lambda *a: pytest.fail("no server without Redis"))
        notes = {row.id: (row.status, row.note) for row in runner.rows}
        assert notes["session_store_redis"] == ("skipped", bench_sessions.NO_REDIS)
        assert notes["idle_sessions"] == ("skipped", "give --idle-sessions N to measure" if idle == "0"
                                          else bench_sessions.NO_REDIS)


def test_bad_session_arguments_are_refused() -> None:
    for argv in (["--store-calls", "0"], ["--idle-sessions", "-1"], ["--redis-url", "localhost:6379"]):
        with pytest.raises(SystemExit) as exit_info:
            bench.main(["--model", "m", *argv])
        assert exit_info.value.code == 2


def test_ctrl_c_during_the_redis_rows_stops_redis_and_the_server(tiny_model_dir: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    if shutil.which("redis-server") is None:
        pytest.skip(NO_REDIS)
    servers: list[bench_process.ServerProcess] = []
    redises: list = []
    _record_starts(monkeypatch, servers, redises)

    def interrupted(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise KeyboardInterrupt

    # Only the Redis-backed server does anything, and its first row is interrupted.
    monkeypatch.setattr(bench.Bench, "first_server", lambda self, server: None)
    monkeypatch.setattr(bench.Bench, "second_server", lambda self, server: None)
    monkeypatch.setattr(bench_sessions, "session_call_times", interrupted)
    argv = ["--model", str(tiny_model_dir), "--device", "cpu", "--json", str(tmp_path / "bench.json")]
    assert bench.main(argv) == 130
    assert not (tmp_path / "bench.json").exists()
    assert len(servers) == 3 and len(redises) == 1
    assert all(server.process.poll() is not None for server in servers)
    assert redises[0].poll() is not None


def test_rows_9_to_11_print_as_a_table_of_their_own() -> None:
    prefix = PrefixCacheResult(row=9, id="prefix_cache", title="prefix", prompt_chars=9, cold_first_char_ms=4.0,
                               warm_first_char_ms=2.0, cold_over_warm=2.0, repeats=3, cold_hits=0, warm_hits=2,
                               skipped_chars=18, status="failed", note="warm calls hit the prefix cache 2/3 times")
    store = SessionStoreResult(row=10, id="session_store_memory", title="memory", store="memory", calls=5,
                               call_ms_p50=1.0, call_ms_p99=2.0, creates=3, create_ms_p50=0.5)
    idle = IdleSessionsResult(row=11, id="idle_sessions", title="idle", sessions=4, seconds=1.0,
                              redis_used_memory_before=1000, redis_used_memory_after=5000,
                              redis_bytes_per_session=1000.0, server_rss_before=None, server_rss_after=None)
    out = io.StringIO()
    print_report(Report(settings={}, machine={}, rows=[prefix, store, idle]), out)
    header, *lines = out.getvalue().split("\n\n")[0].splitlines()
    assert header.split()[2:5] == ["cold", "ms", "warm"] and "chars/s" not in header and len(lines) == 3
    assert "FAILED: warm calls hit" in lines[0] and "1,000" in lines[2]
