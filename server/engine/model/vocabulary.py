"""Characters <-> token ids for the served model (the server's own, torch-free tokenizer).

The server builds its Vocabulary from the characters stored in the served .onnx
file's metadata (charstream.vocab, read by model_dir.py), never from training's
Vocab or a checkpoint's vocab.json.

unknown_chars is the one check for characters outside a vocabulary: the
server's request validation, training's Vocab and the export's prompt all use
it. This module imports nothing beyond the standard library so that training
(torch, no server dependencies) can import it too.
"""

from __future__ import annotations

from collections.abc import Container, Iterable, Sequence


def unknown_chars(text: str, known: Container[str]) -> list[str]:
    """Distinct characters of `text` not in `known`, in order of first use."""
    return list(dict.fromkeys(ch for ch in text if ch not in known))


class Vocabulary:
    """The model's ordered characters; the index of a character is its token id."""

    def __init__(self, chars: Sequence[str]):
        self.chars: list[str] = list(chars)
        self._ids = {ch: i for i, ch in enumerate(self.chars)}

    def __len__(self) -> int:
        return len(self.chars)

    def unknown(self, text: str) -> list[str]:
        """Distinct characters of `text` the model does not know, in order of first use."""
        return unknown_chars(text, self._ids)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; callers check `unknown(text)` first (KeyError otherwise)."""
        return [self._ids[ch] for ch in text]

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.chars[i] for i in ids)
