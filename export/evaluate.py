"""Teacher-forced validation loss of an exported cell, next to PyTorch's on the same streams.

The validation text is the last 10% of the given text, the split training uses.
It is cut into parallel streams (contiguous chunks) that all start from the
zero state; the cell steps all of them at once, one batch per character.
Training's own validation figure uses shorter windows, so it differs; PyTorch
is scored here on the same streams as the graphs, so the deltas are exact.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from export.runtime import CellRunner

VALIDATION_FRACTION = 0.1
DEFAULT_STREAMS = 64
MIN_STREAM_LENGTH = 16


class EvalTextError(ValueError):
    """An evaluation text that cannot be scored with this model."""


def validation_part(text: str) -> str:
    """The last 10% of the text, counted exactly as training's split counts it."""
    validation_chars = int(len(text) * VALIDATION_FRACTION)
    return text[len(text) - validation_chars :]


def load_streams(path: Path, vocab: list[str], streams: int = DEFAULT_STREAMS) -> np.ndarray:
    """Read a text file, keep its validation part, and cut it into token streams [S, T]."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise EvalTextError(f"cannot read evaluation text {path}: {exc}") from exc
    part = validation_part(text)
    index = {ch: i for i, ch in enumerate(vocab)}
    unknown = sorted({ch for ch in part if ch not in index})
    if unknown:
        raise EvalTextError(
            f"evaluation text {path} has characters the model's vocabulary lacks: {unknown[:10]!r}"
        )
    if len(part) < 2:
        raise EvalTextError(f"evaluation text {path} is too short: its last 10% has {len(part)} characters")
    ids = np.fromiter((index[ch] for ch in part), dtype=np.int64, count=len(part))
    # Fewer, longer streams for short texts: each stream needs some context to be meaningful.
    count = max(1, min(streams, len(ids) // MIN_STREAM_LENGTH))
    length = len(ids) // count
    return ids[: count * length].reshape(count, length)  # [S, T]


def cell_loss(runner: CellRunner, streams: np.ndarray, num_layers: int, hidden_size: int) -> float:
    """Mean next-character cross-entropy (nats) of the cell over streams [S, T] from the zero state."""
    count, length = streams.shape
    hidden = np.zeros((num_layers, count, hidden_size), dtype=np.float32)  # [L, S, H]
    total = 0.0
    for t in range(length - 1):
        logits, hidden = runner.step(streams[:, t], hidden)  # logits [S, V]
        logits = logits.astype(np.float64)
        peak = logits.max(axis=1)  # [S]
        log_norm = peak + np.log(np.exp(logits - peak[:, None]).sum(axis=1))  # [S]
        total += float((log_norm - logits[np.arange(count), streams[:, t + 1]]).sum())
    return total / (count * (length - 1))
