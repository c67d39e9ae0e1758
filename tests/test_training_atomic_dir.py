"""The one atomic directory swap that training's checkpoints and export's model directories share."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from training import atomic_dir
from training.atomic_dir import backup_path, recover, write_atomically


def _write(text: str):
    return lambda d: (d / "config.json").write_text(text)


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_a_failed_write_leaves_the_previous_directory_and_no_staging(tmp_path: Path) -> None:
    out = tmp_path / "ck"
    write_atomically(out, _write("1"))

    def crash(d: Path) -> None:
        (d / "config.json").write_text("2")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_atomically(out, crash)
    assert (out / "config.json").read_text() == "1"
    assert _leftovers(tmp_path) == []


def test_a_failed_final_rename_puts_the_previous_directory_back(tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "ck"
    write_atomically(out, _write("1"))
    real_replace = os.replace

    def failing_replace(src, dst):
        if ".partial-" in Path(src).name:  # the staging -> out rename
            raise OSError("no space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(atomic_dir.os, "replace", failing_replace)
    with pytest.raises(OSError, match="no space left"):
        write_atomically(out, _write("2"))
    assert (out / "config.json").read_text() == "1"
    assert _leftovers(tmp_path) == []


def test_a_crash_between_the_renames_is_recovered(tmp_path: Path) -> None:
    out = tmp_path / "ck"
    write_atomically(out, _write("1"))
    out.rename(backup_path(out))  # where the previous directory waits during a swap
    recover(out)
    assert (out / "config.json").read_text() == "1"
    recover(out)  # nothing to do when `out` exists
    assert _leftovers(tmp_path) == []


def test_a_stale_backup_does_not_block_the_next_swap(tmp_path: Path) -> None:
    out = tmp_path / "ck"
    write_atomically(out, _write("1"))
    backup_path(out).mkdir()
    (backup_path(out) / "config.json").write_text("stale")
    write_atomically(out, _write("2"))
    assert (out / "config.json").read_text() == "2"
    assert _leftovers(tmp_path) == []


def test_an_empty_existing_directory_is_replaced(tmp_path: Path) -> None:
    out = tmp_path / "ck"
    out.mkdir()
    write_atomically(out, _write("1"))
    assert (out / "config.json").read_text() == "1"


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
def test_the_new_directory_has_the_permissions_of_a_plain_mkdir(tmp_path: Path) -> None:
    previous = os.umask(0o022)  # the staging directory starts private (0700); the result must not
    try:
        write_atomically(tmp_path / "ck", _write("1"))
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "ck").stat().st_mode) == 0o755


def test_missing_parents_are_created(tmp_path: Path) -> None:
    out = tmp_path / "a" / "b" / "ck"
    write_atomically(out, _write("1"))
    assert (out / "config.json").read_text() == "1"
