"""The merged /metrics of several front-ends: samples added, the engine's identical ones once."""

from __future__ import annotations

from server.frontends.metrics_merge import merge_expositions

FIRST = """# HELP charstream_generated_chars_total Characters.
# TYPE charstream_generated_chars_total counter
charstream_generated_chars_total 10.0
charstream_generated_chars_created 1700000100.0
# HELP charstream_active_sessions Live sessions.
# TYPE charstream_active_sessions gauge
charstream_active_sessions 7.0
charstream_step_seconds_bucket{le="0.001"} 3.0
charstream_sessions_removed_total{reason="closed"} 4.0
"""
SECOND = """# HELP charstream_generated_chars_total Characters.
# TYPE charstream_generated_chars_total counter
charstream_generated_chars_total 2.5
charstream_generated_chars_created 1700000000.0
# HELP charstream_active_sessions Live sessions.
# TYPE charstream_active_sessions gauge
charstream_active_sessions 7.0
charstream_step_seconds_bucket{le="0.001"} 0.0
charstream_sessions_removed_total{reason="closed"} 5.0
charstream_rpc_errors_total{code="NOT_FOUND",method="GetSession"} 1.0
"""


def test_samples_add_up_and_the_engine_totals_are_taken_once() -> None:
    merged = merge_expositions([FIRST, SECOND]).splitlines()
    assert "charstream_generated_chars_total 12.5" in merged
    assert "charstream_generated_chars_created 1700000000.0" in merged  # the earliest start
    assert "charstream_active_sessions 7.0" in merged  # the engine's count: never added
    assert 'charstream_sessions_removed_total{reason="closed"} 5.0' in merged
    assert 'charstream_step_seconds_bucket{le="0.001"} 3.0' in merged
    assert 'charstream_rpc_errors_total{code="NOT_FOUND",method="GetSession"} 1.0' in merged  # in one only
    assert merged.count("# TYPE charstream_generated_chars_total counter") == 1


def test_no_frontend_answering_gives_an_empty_exposition() -> None:
    assert merge_expositions([]) == "\n"
