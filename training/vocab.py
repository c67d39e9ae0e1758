"""Character vocabulary: the sorted set of a corpus's characters; index = token id.

Torch-free on purpose: the export stage loads it with checkpoints. The server does not use it:
it reads the vocabulary from the .onnx metadata (server/engine/model/vocabulary.py) and shares only
unknown_chars.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Sequence

from server.engine.model.vocabulary import unknown_chars


class VocabError(ValueError):
    """Text or a vocabulary file that cannot be used."""


class Vocab:
    """An ordered list of distinct characters with encode/decode."""

    def __init__(self, chars: Sequence[str]):
        chars = list(chars)
        if not chars:
            raise VocabError("vocabulary is empty")
        for ch in chars:
            if not isinstance(ch, str) or len(ch) != 1:
                raise VocabError(f"vocabulary entries must be single characters, got {ch!r}")
        if len(set(chars)) != len(chars):
            raise VocabError("vocabulary has duplicate characters")
        self.chars: list[str] = chars
        self._index = {ch: i for i, ch in enumerate(chars)}

    @classmethod
    def from_text(cls, text: str) -> "Vocab":
        """Sorted set of the text's characters: deterministic for a given text."""
        if not text:
            raise VocabError("cannot build a vocabulary from empty text")
        return cls(sorted(set(text)))

    def __len__(self) -> int:
        return len(self.chars)

    def __contains__(self, ch: object) -> bool:
        return ch in self._index

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocab) and other.chars == self.chars

    def unknown_chars(self, text: str) -> list[str]:
        """Distinct characters of `text` not in the vocabulary, in order of first use."""
        return unknown_chars(text, self._index)

    def encode(self, text: str) -> list[int]:
        unknown = self.unknown_chars(text)
        if unknown:
            raise VocabError(f"characters not in the vocabulary: {unknown!r}")
        return [self._index[ch] for ch in text]

    def decode(self, ids: Iterable[int]) -> str:
        try:
            return "".join(self.chars[i] for i in ids)
        except IndexError as exc:
            raise VocabError(f"token id out of range 0..{len(self) - 1}") from exc

    def to_json(self) -> str:
        return json.dumps(self.chars, ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> "Vocab":
        try:
            chars = json.loads(text)
        except json.JSONDecodeError as exc:
            raise VocabError(f"vocabulary is not valid JSON: {exc}") from exc
        if not isinstance(chars, list):
            raise VocabError("vocabulary JSON must be a list of characters")
        return cls(chars)

    def save(self, path: Path) -> None:
        Path(path).write_text(self.to_json(), encoding="utf-8")

    @classmethod
    def load(cls, path: Path) -> "Vocab":
        return cls.from_json(Path(path).read_text(encoding="utf-8"))
