"""Teacher-forced validation loss of an exported cell, next to PyTorch's on the same streams.

The validation text is the last `val_fraction` of the given text, the split
training used: the fraction comes from the checkpoint's config.json (the
training default when the checkpoint does not record it), and the boundary is
counted by training's own split function. It is cut into parallel streams
(contiguous chunks) that all start from the zero state; the cell steps all of
them at once, one batch per character. Training's own validation figure uses
shorter windows, so it differs; PyTorch is scored here on the same streams as
the graphs, so the deltas are exact.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from export.runtime import CellRunner
from training.data import validation_length
from training.settings import Settings

# A checkpoint that does not record its split was trained with the default.
DEFAULT_VAL_FRACTION: float = Settings.val_fraction
DEFAULT_STREAMS = 64
MIN_STREAM_LENGTH = 16


class EvalTextError(ValueError):
    """An evaluation text that cannot be scored with this model."""


def validation_fraction(checkpoint_config: dict[str, Any]) -> float:
    """The `val_fraction` a checkpoint was trained with (its config.json), or training's default."""
    training = checkpoint_config.get("training") or {}
    settings = training.get("settings") or {}
    value = settings.get("val_fraction")
    if value is None:
        return DEFAULT_VAL_FRACTION
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise EvalTextError(f"the checkpoint's config.json records val_fraction {value!r}, not a number in (0, 1)")
    return float(value)


def validation_part(text: str, val_fraction: float) -> str:
    """The last `val_fraction` of the text, counted exactly as training's split counts it."""
    return text[len(text) - validation_length(len(text), val_fraction) :]


def load_streams(
    path: Path, vocab: list[str], streams: int = DEFAULT_STREAMS, *, val_fraction: float
) -> np.ndarray:
    """Read a text file, keep its last `val_fraction`, and cut that into token streams [S, T].

    `val_fraction` has no default on purpose: it must be the checkpoint's own
    (see `validation_fraction`), or the part scored is not training's validation split.
    """
    try:
        # utf-8-sig: training drops a leading byte-order mark too, and the
        # split boundary must be counted on the same characters.
        text = Path(path).read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise EvalTextError(f"cannot read evaluation text {path}: {exc}") from exc
    part = validation_part(text, val_fraction)
    index = {ch: i for i, ch in enumerate(vocab)}
    unknown = sorted({ch for ch in part if ch not in index})
    if unknown:
        raise EvalTextError(
            f"evaluation text {path} has characters the model's vocabulary lacks: {unknown[:10]!r}"
        )
    if len(part) < 2:
        raise EvalTextError(
            f"evaluation text {path} is too short: its validation part "
            f"(the last {val_fraction:g}) has {len(part)} characters"
        )
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
