"""Replace a directory atomically: fill a staging directory, then swap it in.

Training saves every checkpoint this way and export writes its model
directory this way, so a reader of OUT only ever sees a complete directory:
the previous one or the new one.

    .OUT.partial-XXXX   the staging directory, unique per writer, removed on any failure
    .OUT.old            the previous OUT while the swap runs; removed after it

The swap is two renames (OUT -> .OUT.old, staging -> OUT). If the second
rename fails, the previous OUT is put back at once; if the process dies
between the two, OUT is missing and `recover` puts .OUT.old back.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable


def backup_path(out: Path) -> Path:
    """Where the previous `out` waits while the swap runs (a fixed name, so `recover` finds it)."""
    return out.with_name(f".{out.name}.old")


def recover(out: Path) -> None:
    """Put back the previous directory if a swap died between its two renames."""
    out = Path(out)
    if not out.exists() and backup_path(out).is_dir():
        os.replace(backup_path(out), out)


def make_staging(out: Path) -> Path:
    """A new, empty staging directory next to `out` (same file system, so the swap is a rename).

    Raises OSError when the parent of `out` cannot be created or written.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # A unique name, so that a second writer never deletes this one's staging.
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))


def discard(staging: Path) -> None:
    """Remove a staging directory that will not be swapped in."""
    shutil.rmtree(staging, ignore_errors=True)


def swap_in(staging: Path, out: Path) -> None:
    """Make the finished `staging` directory `out`; the previous `out`, if any, is removed after.

    On a failed swap `out` is left as it was (the previous directory is put
    back) and the error is raised; `staging` is then still there for the
    caller to discard.
    """
    staging, out = Path(staging), Path(out)
    # mkdtemp made the directory private (0700); give it the permissions a
    # plain mkdir would have, before it becomes visible as `out`.
    os.chmod(staging, 0o777 & ~_current_umask())
    _fsync_tree(staging)
    backup = backup_path(out)
    moved_aside = out.exists()
    if moved_aside:
        # A leftover backup is stale: `out` exists, so no swap is waiting on it.
        shutil.rmtree(backup, ignore_errors=True)
        os.replace(out, backup)
    try:
        os.replace(staging, out)
    except OSError:
        if moved_aside:  # put the previous directory back rather than lose it
            os.replace(backup, out)
        raise
    _fsync_dir(out.parent)
    shutil.rmtree(backup, ignore_errors=True)


def write_atomically(out: Path, write: Callable[[Path], None]) -> None:
    """Call write(staging) to fill a fresh directory, then swap it in as `out`.

    If `write` or the swap fails, the staging directory is removed and `out`
    is untouched.
    """
    staging = make_staging(out)
    try:
        write(staging)
        swap_in(staging, Path(out))
    except BaseException:
        discard(staging)
        raise


def _fsync_tree(root: Path) -> None:
    """Flush files (and, where the OS allows, directories) to disk before the swap."""
    for path in [*root.rglob("*"), root]:
        if path.is_dir():
            _fsync_dir(path)
        else:
            _fsync_path(path, os.O_RDONLY)


def _fsync_dir(path: Path) -> None:
    """Flush a directory's entries (renames in it), where the OS can open directories."""
    o_directory = getattr(os, "O_DIRECTORY", None)
    if o_directory is not None:
        _fsync_path(path, os.O_RDONLY | o_directory)


def _fsync_path(path: Path, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _current_umask() -> int:
    # The umask can only be read by setting it; set it straight back.
    mask = os.umask(0)
    os.umask(mask)
    return mask
