"""Processes on this machine by their command line: what tests check is gone after a run."""

from __future__ import annotations

from pathlib import Path


def pids_with_args(*args: str) -> list[int]:
    """Live processes whose argv holds every one of `args` as a whole argument."""
    wanted = [arg.encode() for arg in args]
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if all(arg in argv for arg in wanted):
            pids.append(int(entry.name))
    return pids
