"""The flag tables in docs/, generated from the programs' own argument parsers so that flags and docs cannot drift.

    python -m server.config_docs --markdown   # print charstream-serve's table
    python -m server.config_docs --write      # rewrite every generated table in docs/
    python -m server.config_docs --check      # exit 1 naming the tables that differ (tests/test_config_docs.py)

Each table stands in its page between two markers (see `begin_marker`); the text
around them is written by hand and left alone. A new flag needs only `--write`.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
COMMAND = "python -m server.config_docs --write"
# What the table's own columns say, cut from the help: server/config.py's build_parser ends each help text with
# "[env NAME; default VALUE]", and other programs' help says "(default: VALUE)" for --help's sake.
SERVER_SOURCE = re.compile(r"\s*\[env [A-Z0-9_]+; default .*\]$", re.DOTALL)
SAID_DEFAULT = re.compile(r"\s*\(default:? [^()]*\)")


def _help_text(action: argparse.Action, prog: str, default_shown: bool) -> str:
    """The help as --help prints it (%(default)s and the like filled in), less what the other columns say."""
    text = action.help or ""
    if "%" in text:  # argparse's own expansion rules (HelpFormatter._expand_help)
        params = {**vars(action), "prog": prog}
        if action.choices is not None:
            params["choices"] = ", ".join(map(str, action.choices))
        text = text % params
    text = SERVER_SOURCE.sub("", text)
    if default_shown:  # a default the help words otherwise, "(default: 1 for up to 64 streams, ...)", stays
        text = SAID_DEFAULT.sub("", text)
    if action.choices is not None and not all(str(choice) in text for choice in action.choices):
        text = f"{text}; one of " if text else "one of "
        text += ", ".join(f"`{choice}`" for choice in action.choices)
    return " ".join(text.split())


def _default(action: argparse.Action) -> str:
    if action.required:
        return "required"
    if action.nargs == 0 and not isinstance(action, argparse.BooleanOptionalAction):
        return "off"  # a switch: not given (--no-lane's default True means just that)
    value = action.default
    if value is None or value is argparse.SUPPRESS:
        return ""
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, (list, tuple)):
        return f"`{' '.join(map(str, value))}`"
    return f"`{value}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def flags_table(parser: argparse.ArgumentParser, env: Callable[[str], str] | None = None) -> str:
    """A Markdown table of the parser's flags, a table per argument group with a title (the first untitled):
    flag, environment variable (when `env` names one per dest), default, help."""
    header = ["flag"] + (["environment"] if env else []) + ["default", "meaning"]
    out: list[str] = []
    # argparse keeps its groups private; this is the list its own --help walks.
    for group in parser._action_groups:
        actions = [a for a in group._group_actions if a.option_strings and a.dest != "help"]
        if not actions:
            continue
        if out:
            out += ["", f"*{group.title}*", ""]
        out += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for action in actions:
            row = [" ".join(f"`{flag}`" for flag in action.option_strings)]
            row += [f"`{env(action.dest)}`"] if env else []
            default = _default(action)
            row += [default, _help_text(action, parser.prog, default_shown=bool(default))]
            out.append("| " + " | ".join(_cell(text) for text in row) + " |")
    return "\n".join(out)


def server_table() -> str:
    """charstream-serve's flags, with defaults as a bare environment gives them (not this machine's CHARSTREAM_*)."""
    from server.config import build_parser, env_name

    return flags_table(build_parser({}), env=env_name)


def bench_table() -> str:
    from server.bench.args import build_parser

    return flags_table(build_parser())


def loadtest_table() -> str:
    from server.bench.loadtest import build_parser

    return flags_table(build_parser())


def engine_cost_table() -> str:
    from server.bench.engine_cost import build_parser

    return flags_table(build_parser())


@dataclass(frozen=True)
class Table:
    page: str  # relative to the repository root
    name: str
    render: Callable[[], str]

    def begin_marker(self) -> str:
        return f"<!-- generated: {self.name}, by {COMMAND}; do not edit by hand -->"

    def end_marker(self) -> str:
        return f"<!-- end of generated: {self.name} -->"


TABLES = (
    Table("docs/configuration.md", "charstream-serve flags", server_table),
    Table("docs/benchmark.md", "charstream-bench flags", bench_table),
    Table("docs/benchmark.md", "charstream-loadtest flags", loadtest_table),
    Table("docs/benchmark.md", "engine_cost flags", engine_cost_table),
)


def with_table(text: str, table: Table) -> str:
    """`text` with the block between the table's markers replaced by the table as generated now."""
    begin, end = table.begin_marker(), table.end_marker()
    start, stop = text.find(begin), text.find(end)
    if start < 0 or stop < start:
        raise ValueError(f"{table.page} has no {table.name!r} block: put the lines\n{begin}\n{end}\n"
                         f"where the table goes, then run {COMMAND}")
    # Blank lines about the table: a renderer then reads the markers as HTML comments, apart from the table.
    return text[:start] + f"{begin}\n\n{table.render()}\n\n" + text[stop:]


def stale_pages(root: Path | None = None) -> dict[str, str]:
    """page -> its text with every table regenerated, for the pages where that differs from the file
    (pages relative to `root`, the repository's root by default)."""
    root = root or REPO_ROOT
    pages: dict[str, str] = {}
    for table in TABLES:
        if table.page not in pages:
            pages[table.page] = (root / table.page).read_text(encoding="utf-8")
        pages[table.page] = with_table(pages[table.page], table)
    return {page: text for page, text in pages.items() if text != (root / page).read_text(encoding="utf-8")}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m server.config_docs", description=__doc__.split("\n\n")[0])
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--markdown", action="store_true", help="print charstream-serve's flags table")
    what.add_argument("--write", action="store_true", help="rewrite the generated tables in docs/")
    what.add_argument("--check", action="store_true", help="exit 1 if a generated table in docs/ is out of date")
    args = parser.parse_args(argv)
    if args.markdown:
        print(server_table())
        return 0
    stale = stale_pages()
    for page, text in stale.items():
        if args.write:
            (REPO_ROOT / page).write_text(text, encoding="utf-8")
        print(f"{'wrote' if args.write else 'out of date:'} {page}", file=sys.stderr)
    if args.check and stale:
        print(f"run {COMMAND}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
