"""Characters <-> token ids for the served model (the server's own, torch-free tokenizer)."""

from __future__ import annotations

from typing import Iterable, Sequence


class Vocabulary:
    """The model's ordered characters; the index of a character is its token id."""

    def __init__(self, chars: Sequence[str]):
        self.chars: list[str] = list(chars)
        self._ids = {ch: i for i, ch in enumerate(self.chars)}

    def __len__(self) -> int:
        return len(self.chars)

    def unknown(self, text: str) -> list[str]:
        """Distinct characters of `text` the model does not know, in order of first use."""
        seen: dict[str, None] = {}
        for ch in text:
            if ch not in self._ids:
                seen.setdefault(ch, None)
        return list(seen)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; callers check `unknown(text)` first (KeyError otherwise)."""
        return [self._ids[ch] for ch in text]

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.chars[i] for i in ids)
