"""Every command line the docs show parses with the command's own parser.

The README, the stage READMEs and the topic pages show charstream-* command
lines to copy. A renamed or removed flag would leave them failing with a usage
error; this test finds each such line in the code blocks (fenced or indented)
and hands its arguments to the real argparse parser, so docs and flags cannot
drift. Usage synopses ("[--flag N]", "...", "a|b") are not runnable lines and
are left out.
"""

from __future__ import annotations

import argparse
import importlib
import re
import shlex
from pathlib import Path
from typing import Callable

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")),
        *(ROOT / folder / "README.md" for folder in ("server", "training", "export", "protos"))]


def _parser(module: str, *args: object) -> Callable[[], argparse.ArgumentParser]:
    return lambda: importlib.import_module(module).build_parser(*args)


# The console script (or python -m module) -> the parser its main() uses.
PARSERS: dict[str, Callable[[], argparse.ArgumentParser]] = {
    "charstream-train": _parser("training.cli"),
    "charstream-sample": _parser("training.sample"),
    "charstream-export": _parser("export.cli"),
    "charstream-serve": _parser("server.config", {}),
    "charstream-generate": _parser("server.clients.generate_cli"),
    "charstream-bench": _parser("server.bench.args"),
    "charstream-loadtest": _parser("server.bench.loadtest"),
    "server.bench.engine_cost": _parser("server.bench.engine_cost"),
}
MODULES = {"training": "charstream-train", "training.sample": "charstream-sample", "export": "charstream-export",
           "server": "charstream-serve", "server.bench.bench": "charstream-bench",
           "server.bench.loadtest": "charstream-loadtest", "server.bench.engine_cost": "server.bench.engine_cost"}
SYNOPSIS = re.compile(r"\[|\.\.\.|\||<")
PLACEHOLDER = re.compile(r"[A-Z]")  # a one-letter stand-in for a value: --length N


def code_lines(text: str) -> list[str]:
    """The logical lines of a page's code blocks: fenced ones and 4-space-indented ones, with
    backslash continuations joined."""
    lines, fenced = [], False
    for raw in text.splitlines():
        if raw.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if fenced or raw.startswith("    "):
            lines.append(raw.strip())
    joined: list[str] = []
    for line in lines:
        if joined and joined[-1].endswith("\\"):
            joined[-1] = joined[-1][:-1] + " " + line
        else:
            joined.append(line)
    return joined


def command_of(line: str) -> tuple[str, list[str]] | None:
    """(command, its arguments) when the line runs one of the project's commands, else None."""
    line = line.removeprefix("$ ")
    try:
        words = shlex.split(line, comments=True)
    except ValueError:  # not shell: a quote that does not close, e.g. inside prose or JSON
        return None
    while words and "=" in words[0] and not words[0].startswith("-"):  # VAR=value before a command
        words = words[1:]
    if not words:
        return None
    head = words[0].rsplit("/", 1)[-1]  # .venv/bin/charstream-serve
    if head in PARSERS:
        return head, words[1:]
    if head in ("python", "python3") and len(words) > 2 and words[1] == "-m" and words[2] in MODULES:
        return MODULES[words[2]], words[3:]
    return None


def documented_commands() -> list[tuple[str, str, list[str]]]:
    found = []
    for page in DOCS:
        if not page.exists():
            continue
        for line in code_lines(page.read_text(encoding="utf-8")):
            command = command_of(line)
            if command is not None and not SYNOPSIS.search(line) and not any(PLACEHOLDER.fullmatch(w) for w in command[1]):
                found.append((page.relative_to(ROOT).as_posix(), *command))
    return found


COMMANDS = documented_commands()


def test_the_readme_shows_every_stage_command() -> None:
    shown = {command for page, command, _ in COMMANDS if page == "README.md"}
    assert {"charstream-train", "charstream-sample", "charstream-export", "charstream-serve",
            "charstream-generate"} <= shown


@pytest.mark.parametrize("page,command,argv", COMMANDS,
                         ids=[f"{page}:{command}:{i}" for i, (page, command, _) in enumerate(COMMANDS)])
def test_documented_command_parses(page: str, command: str, argv: list[str]) -> None:
    parser = PARSERS[command]()
    parser.exit_on_error = False
    try:
        parser.parse_args(argv)
    except (argparse.ArgumentError, SystemExit) as exc:
        pytest.fail(f"{page}: `{command} {shlex.join(argv)}` does not parse: {exc}")


def test_a_changed_flag_is_caught() -> None:
    """The check itself fails on a flag the parser does not know (so it cannot pass by parsing nothing)."""
    parser = PARSERS["charstream-serve"]()
    with pytest.raises(SystemExit):
        parser.parse_args(["--model", "m", "--no-such-flag"])
