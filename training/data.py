"""Train/validation split and batches of character sequences.

The split is contiguous: the last `val_fraction` of the text is validation.
An epoch cuts the training split into non-overlapping windows of
`seq_len + 1` characters (input = window[:-1], target = window[1:]), starting
at an offset in [0, seq_len) and visited in a shuffled order; offset and order
are a pure function of (seed, epoch). So the position in the data is fully
described by (epoch, batch index) and a resumed run sees exactly the batches
an uninterrupted one would.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class DataError(ValueError):
    """Text that is too short for the requested split and sequence length."""


@dataclass
class Split:
    train: torch.Tensor  # int64 [N_train]
    val: torch.Tensor  # int64 [N_val]


def validation_length(total: int, val_fraction: float) -> int:
    """How many of `total` characters the validation part (the last ones) holds.

    The one definition of the split's boundary: training's split and export's
    evaluation both count it here, so they hold out the same characters.
    """
    return int(total * val_fraction)


def split_ids(ids: torch.Tensor, seq_len: int, val_fraction: float = 0.1) -> Split:
    """Contiguous split; each part must hold at least one sequence (seq_len + 1 chars)."""
    if seq_len < 1:
        raise DataError(f"--seq-len must be at least 1, got {seq_len}")
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"--val-fraction must be between 0 and 1, got {val_fraction}")
    n = len(ids)
    need = seq_len + 1
    if n < need:
        raise DataError(
            f"corpus has {n} characters, shorter than one sequence "
            f"(--seq-len {seq_len} needs {need})"
        )
    n_val = validation_length(n, val_fraction)
    n_train = n - n_val
    if n_train < need or n_val < need:
        raise DataError(
            f"corpus has {n} characters: with --val-fraction {val_fraction} the "
            f"train ({n_train}) and validation ({n_val}) parts must each hold one "
            f"sequence of {need} characters; use a longer corpus or a smaller --seq-len"
        )
    return Split(train=ids[:n_train], val=ids[n_train:])


class Batches:
    """Batches of training windows, deterministic in (seed, epoch)."""

    def __init__(self, train: torch.Tensor, seq_len: int, batch_size: int, seed: int):
        if batch_size < 1:
            raise DataError(f"--batch-size must be at least 1, got {batch_size}")
        self.train = train
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.seed = seed
        self._offsets = torch.arange(seq_len + 1)
        self._epoch: int | None = None
        self._starts = torch.empty(0, dtype=torch.long)

    def _generator(self, epoch: int) -> torch.Generator:
        return torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % 2**63)

    def windows_per_epoch(self, epoch: int = 0) -> int:
        return len(self._epoch_starts(epoch))

    def batches_per_epoch(self, epoch: int = 0) -> int:
        return -(-self.windows_per_epoch(epoch) // self.batch_size)  # last batch may be short

    def _epoch_starts(self, epoch: int) -> torch.Tensor:
        """Start index of every window of `epoch`, in visiting order."""
        if self._epoch != epoch:
            g = self._generator(epoch)
            n = len(self.train)
            # Shift the window grid so that windows cross different boundaries
            # each epoch; the shift never drops below one whole window.
            max_shift = min(self.seq_len, n - (self.seq_len + 1) + 1)
            shift = int(torch.randint(max_shift, (1,), generator=g))
            count = (n - shift - 1) // self.seq_len
            starts = shift + torch.arange(count) * self.seq_len
            self._starts = starts[torch.randperm(count, generator=g)]
            self._epoch = epoch
        return self._starts

    def batch(self, epoch: int, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), each int64 [B, seq_len]."""
        starts = self._epoch_starts(epoch)[index * self.batch_size : (index + 1) * self.batch_size]
        windows = self.train[starts[:, None] + self._offsets]  # [B, T + 1]
        return windows[:, :-1], windows[:, 1:]

    def next_position(self, epoch: int, index: int) -> tuple[int, int]:
        """The (epoch, batch index) that follows batch `index` of `epoch`."""
        return (epoch, index + 1) if index + 1 < self.batches_per_epoch(epoch) else (epoch + 1, 0)


def validation_windows(val: torch.Tensor, seq_len: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The whole validation split as windows of seq_len targets (the last may be shorter).

    Windows overlap by one character, so every character of val[1:] is a
    target exactly once. Returned as (inputs, targets) groups of equal length:
    one [W, seq_len] group, plus a [1, r] group for the remainder.
    """
    n_targets = len(val) - 1
    full = n_targets // seq_len
    groups = []
    if full:
        starts = torch.arange(full) * seq_len
        windows = val[starts[:, None] + torch.arange(seq_len + 1)]
        groups.append((windows[:, :-1], windows[:, 1:]))
    rest = n_targets - full * seq_len
    if rest:
        tail = val[full * seq_len :]
        groups.append((tail[None, :-1], tail[None, 1:]))
    return groups
