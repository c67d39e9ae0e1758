"""What a training run is made of (Settings) and when it stops (Limits).

Torch-free, so that `charstream-train --help` is instant and shows these defaults.
"""

from __future__ import annotations

from dataclasses import dataclass

from training.model_config import ModelShape


@dataclass(frozen=True)
class _Corpus:
    corpus: str


@dataclass(frozen=True)
class Settings(ModelShape, _Corpus):
    """What defines a run; fixed at its start and kept for resume.

    The model's size fields (embedding_dim, hidden_size, num_layers, dropout)
    and their defaults come from ModelShape, so they are declared once for
    the run and the model, and are checked when a Settings is made. The
    bases' order keeps `corpus` the first field (see training.model_config),
    so asdict() gives the same "settings" as the files runs were saved with.
    `ModelConfig.for_vocab(settings, vocab_size)` gives the model's config.
    """

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
