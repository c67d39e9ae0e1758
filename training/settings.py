"""What a training run is made of (Settings) and when it stops (Limits).

Torch-free, so that `charstream-train --help` is instant and shows these defaults.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Settings:
    """What defines a run; fixed at its start and kept for resume."""

    corpus: str
    embedding_dim: int = 256
    hidden_size: int = 1024
    num_layers: int = 1
    dropout: float = 0.0
    seq_len: int = 100
    batch_size: int = 64
    val_fraction: float = 0.1
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 1337


@dataclass
class Limits:
    """When to stop (whichever comes first) and how often to report; may change on resume.

    Limits count the whole run: after a resume, max_steps is still the total
    number of steps and max_minutes the total training time.
    """

    epochs: int | None = None
    max_steps: int | None = None
    max_minutes: float | None = None
    eval_every: int = 250
    log_every: int = 10
