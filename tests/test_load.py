"""charstream-loadtest: the short run over a real server process on the tiny model (every character
checked, every session freed, memory back near its baseline), its command line, and its verdict
when the checks fail."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from protos.charstream.v1 import generator_pb2 as pb
from server.bench import loadtest
from server.bench.loadtest_workers import LoadStats, WorkerSession, account

MiB = 1024 * 1024
# RSS after every session is deleted is not expected to return to the baseline exactly: the
# allocator keeps freed arenas and gRPC keeps its buffers (about 1 MiB on the tiny model here).
# 50 MiB is far above that noise and far below what a leak would cost over the run's ~300
# sessions and ~900 streams on the default-size model, where each stream keeps up to lookahead + 1
# host states of 4 KiB and each session a state: leaked per-stream windows or requests show as
# hundreds of MiB, and leaked protobuf text buffers of every received character as tens of MiB.
RSS_GROWTH_BOUND = 50 * MiB


@pytest.mark.slow
def test_short_load_run_checks_every_character_and_frees_everything(tiny_model_dir: Path) -> None:
    args = loadtest.parse_args(["--model", str(tiny_model_dir), "--device", "cpu", "--streams", "24",
                                "--seconds", "8", "--drain-seconds", "20", "--call-timeout", "30",
                                "--settle-seconds", "1"])
    report = loadtest.load_report(args)
    stats = report["stats"]
    assert report["ok"], stats["problems"]
    assert stats["sessions_checked"] >= 24 and stats["chars_received"] >= 24  # each worker checks one at least
    # Every stream ended with a finish reason or a status (no errors: none ended otherwise).
    assert stats["errors"] == {} and stats["unfinished_workers"] == 0
    assert stats["streams_started"] == sum(stats["finished"].values()) + stats["cancelled"]
    assert stats["cancelled"] > 0 and stats["finished"].get("length", 0) > 0
    assert stats["mismatches"] == 0 and stats["lost_chars"] == 0 and stats["repeated_chars"] == 0
    assert report["sessions_left"] == 0 and report["active_sessions_metric"] == 0
    rss = report["rss_bytes"]
    assert None not in rss.values()
    assert rss["end"] < rss["start"] + RSS_GROWTH_BOUND, rss


def test_arguments_have_the_documented_defaults_and_refuse_bad_combinations(
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = loadtest.parse_args(["--target", "localhost:50051"])
    assert (args.streams, args.seconds, args.model, args.api_key, args.json) == (200, 60.0, None, None, None)
    args = loadtest.parse_args(["--model", "m", "--streams", "3", "--seconds", "1.5", "--variant", "fp32",
                                "--json", "out.json"])
    assert (args.model, args.streams, args.seconds, args.variant, args.json) == ("m", 3, 1.5, "fp32", "out.json")
    assert loadtest._server_flags(args)[-2:] == ["--variant", "fp32"]
    for bad in ([], ["--target", "a:1", "--model", "m"], ["--target", "a:1", "--streams", "0"],
                ["--model", "m", "--api-key", "k"]):
        with pytest.raises(SystemExit) as exit_info:
            loadtest.parse_args(bad)
        assert exit_info.value.code == 2
    assert "charstream-loadtest" in capsys.readouterr().err


def _report(stats: LoadStats) -> dict[str, Any]:
    return loadtest.build_report(stats, target="127.0.0.1:1", seconds=1.0, streams=1, seed=1,
                                 model={"file": "model.onnx", "variant": "fp32", "provider": "CPUExecutionProvider"},
                                 sessions_left=0, active_sessions_metric=0.0,
                                 rss_bytes={"start": None, "peak": None, "end": None})


@pytest.mark.parametrize("wrong", [False, True], ids=["right-text", "wrong-text"])
def test_a_text_that_differs_from_the_reference_fails_the_run(
    wrong: bool, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    stats = LoadStats()
    assert stats.check_text("abcdef", "abcxef" if wrong else "abcdef", "session 1") is not wrong

    async def fake_run(*_: object) -> dict[str, Any]:
        return _report(stats)

    monkeypatch.setattr(loadtest, "run_load", fake_run)
    status = loadtest.main(["--target", "127.0.0.1:1", "--json", str(tmp_path / "report.json")])
    assert status == (1 if wrong else 0)
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["ok"] is not wrong and saved["stats"]["mismatches"] == int(wrong)
    out = capsys.readouterr().out
    assert ("FAILED" in out and "differs from the reference at 3" in out) if wrong else "OK" in out


def _info(consumed: int, recent: str) -> pb.SessionInfo:
    return pb.SessionInfo(session_id="s", consumed_chars=consumed, recent_text=recent)


def test_the_accounting_learns_missed_characters_and_catches_lost_or_repeated_ones() -> None:
    stats = LoadStats()
    session = WorkerSession("s" * 32, prompt="ab", seed=1, temperature=1.0)
    # Cancelled after "xy" arrived; the server had also handed over "z": the session keeps it.
    assert account(stats, session, _info(5, "abxyz"), "xy", cancelled=True)
    assert session.text == "xyz" and stats.handed_not_received == 1 and not stats.failed
    # A recent_text that does not end with what was received is a mismatch.
    assert not account(stats, session, _info(7, "abxyzQQ"), "qq", cancelled=False)
    assert stats.mismatches == 1
    # The session holds fewer characters than were received: a continuation would repeat them.
    repeated = LoadStats()
    assert not account(repeated, WorkerSession("s", "ab", 1, 1.0), _info(3, "abx"), "xy", cancelled=False)
    assert repeated.repeated_chars == 1 and repeated.failed
    # A stream that finished normally but the session holds more than it delivered: lost characters.
    lost = LoadStats()
    assert not account(lost, WorkerSession("s", "ab", 1, 1.0), _info(5, "abxyz"), "xy", cancelled=False)
    assert lost.lost_chars == 1 and lost.failed
