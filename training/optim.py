"""AdamW and the learning-rate schedule: linear warmup, then cosine decay.

The schedule is a pure function of the step and of the run's progress, so it
needs no state of its own to resume:

    progress p = max(step / planned_steps, train_seconds / time_budget)

(each term only where that limit is set). With a step limit the schedule is
exact and reproducible. With only --max-minutes the LR decays with elapsed
time and reaches its floor as the time runs out, however fast the machine is.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def make_optimizer(
    model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float] = (0.9, 0.99)
) -> torch.optim.AdamW:
    """AdamW; weight decay on weight matrices and embeddings, not on biases."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=betas)


def progress(
    step: int, planned_steps: int | None, train_seconds: float, time_budget: float | None
) -> float:
    parts = [0.0]
    if planned_steps:
        parts.append(step / planned_steps)
    if time_budget:
        parts.append(train_seconds / time_budget)
    return min(1.0, max(parts))


def lr_at(step: int, p: float, lr: float, warmup_steps: int, min_lr_ratio: float) -> float:
    """LR for `step` (0-based) at progress `p` in [0, 1]."""
    warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    cosine = min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * p))
    return lr * warm * cosine


def set_lr(optimizer: torch.optim.Optimizer, value: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = value
