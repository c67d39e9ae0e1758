"""The generated flag tables in docs/ (server/config_docs.py): up to date with the parsers, and rendered right."""

from __future__ import annotations

import argparse
import difflib
from pathlib import Path

import pytest

from server import config_docs
from server.config import build_parser, env_name
from server.config_docs import (
    COMMAND,
    TABLES,
    Table,
    flags_table,
    stale_pages,
    with_table,
)


def test_the_docs_match_the_parsers() -> None:
    stale = stale_pages()
    diffs = []
    for page, text in stale.items():
        now = (config_docs.REPO_ROOT / page).read_text(encoding="utf-8")
        diff = difflib.unified_diff(now.splitlines(), text.splitlines(), f"{page} (now)", f"{page} (generated)",
                                    lineterm="", n=0)
        diffs.append("\n".join(list(diff)[:40]))
    assert not stale, f"the flag tables in {', '.join(stale)} differ from the parsers: run {COMMAND}\n" + \
        "\n".join(diffs)


def test_every_server_flag_is_a_row_with_its_variable() -> None:
    table = config_docs.server_table()
    flags = [a for a in build_parser({})._actions if a.option_strings and a.dest != "help"]
    assert len([line for line in table.splitlines() if line.startswith("| `--")]) == len(flags)
    for action in flags:
        assert f"| `{action.option_strings[0]}`" in table and f"`{env_name(action.dest)}`" in table
    assert "| `--port` | `CHARSTREAM_PORT` | `50051` | gRPC port; 0 picks a free one" in table
    assert "[env " not in table  # the help's source suffix is in columns of its own


def test_the_server_table_ignores_this_machines_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHARSTREAM_PORT", "6000")
    assert "`50051`" in config_docs.server_table() and "`6000`" not in config_docs.server_table()


def test_a_table_is_rendered_from_any_parser() -> None:
    parser = argparse.ArgumentParser(prog="demo")
    parser.add_argument("--size", type=int, default=3, help="how many (default: %(default)s)")
    parser.add_argument("--mode", choices=("a", "b"), help="a | b: which")
    parser.add_argument("--color", choices=("red", "blue"), help="paint")
    parser.add_argument("--name", required=True, help="who")
    parser.add_argument("--dry-run", action="store_true", help="change nothing")
    parser.add_argument("--fast", action=argparse.BooleanOptionalAction, default=True, help="go fast")
    group = parser.add_argument_group("extras")
    group.add_argument("--sizes", type=int, nargs="+", default=[1, 2], help="several")
    assert flags_table(parser).splitlines() == [
        "| flag | default | meaning |",
        "|---|---|---|",
        "| `--size` | `3` | how many |",  # the default is said once, in its column
        "| `--mode` |  | a \\| b: which |",  # a `|` escaped; choices the help names are not repeated
        "| `--color` |  | paint; one of `red`, `blue` |",
        "| `--name` | required | who |",
        "| `--dry-run` | off | change nothing |",
        "| `--fast` `--no-fast` | `true` | go fast |",
        "",
        "*extras*",
        "",
        "| flag | default | meaning |",
        "|---|---|---|",
        "| `--sizes` | `1 2` | several |",
    ]


def test_a_block_is_replaced_between_its_markers_only() -> None:
    table = Table("page.md", "demo flags", lambda: "| new |")
    text = f"intro\n{table.begin_marker()}\n| old |\n| rows |\n{table.end_marker()}\noutro\n"
    assert with_table(text, table) == f"intro\n{table.begin_marker()}\n\n| new |\n\n{table.end_marker()}\noutro\n"
    with pytest.raises(ValueError, match="has no 'demo flags' block"):
        with_table("intro\n", table)


def test_write_and_check(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    page = tmp_path / "docs" / "page.md"
    page.parent.mkdir()
    table = Table("docs/page.md", "demo flags", lambda: "| new |")
    page.write_text(f"{table.begin_marker()}\n| old |\n{table.end_marker()}\n", encoding="utf-8")
    monkeypatch.setattr(config_docs, "REPO_ROOT", tmp_path)
    monkeypatch.setattr(config_docs, "TABLES", (table,))
    assert config_docs.main(["--check"]) == 1 and "| old |" in page.read_text(encoding="utf-8")
    assert config_docs.main(["--write"]) == 0 and "| new |" in page.read_text(encoding="utf-8")
    assert config_docs.main(["--check"]) == 0


def test_every_table_has_a_page_of_its_own_markers() -> None:
    for table in TABLES:
        text = (config_docs.REPO_ROOT / table.page).read_text(encoding="utf-8")
        assert text.count(table.begin_marker()) == 1 and text.count(table.end_marker()) == 1, table.name
