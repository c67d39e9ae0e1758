"""Everything a run needs before its first step: device, data, model, optimizer, schedule.

`set_up` reads the corpus and splits it, builds the model and AdamW, puts back
a saved run when resuming (training.runstate), and works out the step and
time limits; training.train then runs the steps on what it returns.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from training.corpus import Corpus, load_corpus
from training.data import Batches, split_ids, validation_windows
from training.model import CharGRU, ModelConfig
from training.optim import make_optimizer
from training.runstate import Progress, RunSaver, load_progress, restore_run
from training.settings import Limits, Settings
from training.trainer_dir import SavedTrainer
from training.vocab import Vocab


class TrainError(ValueError):
    """Settings or a run directory that cannot be used; the message is for the user."""


def pick_device(name: str) -> torch.device:
    """The torch device for --device `name` (auto: CUDA when PyTorch sees one, else the CPU)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise TrainError("--device cuda was asked for but PyTorch sees no CUDA device")
    if name not in ("cpu", "cuda"):
        raise TrainError(f"--device must be cpu, cuda or auto, got {name!r}")
    return torch.device(name)


@dataclass
class Run:
    """What the step loop works with, built once by `set_up`."""

    settings: Settings
    limits: Limits
    device: torch.device
    prog: Progress
    batches: Batches
    val_groups: list[tuple[torch.Tensor, torch.Tensor]]
    tokens_per_epoch: int  # characters in the training split
    model: CharGRU
    optimizer: torch.optim.Optimizer
    saver: RunSaver
    planned: int | None  # steps that --epochs / --max-steps allow
    planned_by: str | None  # the limit that sets `planned`
    budget: float | None  # seconds of training that --max-minutes allows
    warmup: int


def set_up(
    settings: Settings, limits: Limits, out: Path, resume_from: Path | None,
    dev: torch.device, corpus: Corpus | None,
) -> Run:  # fmt: skip
    """Read the data, build the model and optimizer, and put back the saved run when resuming."""
    prog, saved = load_progress(resume_from) if resume_from is not None else (Progress(), None)
    corpus = _same_corpus(corpus or load_corpus(settings.corpus), saved)
    vocab = Vocab.from_text(corpus.text)
    ids = torch.tensor(vocab.encode(corpus.text), dtype=torch.long)
    split = split_ids(ids, settings.seq_len, settings.val_fraction)
    batches = Batches(split.train, settings.seq_len, settings.batch_size, settings.seed)
    val_groups = validation_windows(split.val, settings.seq_len)

    torch.manual_seed(settings.seed)
    model_config = ModelConfig.for_vocab(settings, len(vocab))
    model = CharGRU(model_config).to(dev).train()
    optimizer = make_optimizer(model, settings.lr, settings.weight_decay)
    best_weights = None
    if saved:
        best_weights = restore_run(saved, resume_from, model, optimizer, dev)
        prog.stop_reason = None  # the saved run stopped; this one goes on

    planned, planned_by = _planned_steps(limits, batches)
    budget = limits.max_minutes * 60 if limits.max_minutes is not None else None
    if planned is None and budget is None:
        raise TrainError("give at least one of --epochs, --max-steps, --max-minutes")
    warmup = settings.warmup_steps if planned is None else min(settings.warmup_steps, max(1, planned // 10))
    saver = RunSaver(
        out, settings=settings, limits=limits, corpus=corpus,
        train_chars=len(split.train), val_chars=len(split.val), vocab=vocab,
        model_config=model_config, model=model, optimizer=optimizer, device=dev,
        best_weights=best_weights,
    )  # fmt: skip
    return Run(
        settings=settings, limits=limits, device=dev, prog=prog, batches=batches, val_groups=val_groups,
        tokens_per_epoch=len(split.train), model=model, optimizer=optimizer, saver=saver,
        planned=planned, planned_by=planned_by, budget=budget, warmup=warmup,
    )  # fmt: skip


def _same_corpus(corpus: Corpus, saved: SavedTrainer | None) -> Corpus:
    """`corpus`, after checking that a resumed run continues on the text it was trained on."""
    if saved and corpus.sha256 != saved[0]["corpus"]["sha256"]:
        raise TrainError(
            f"the corpus ({corpus.source}, sha256 {corpus.sha256[:12]}…) is not the one this "
            f"run was trained on (sha256 {saved[0]['corpus']['sha256'][:12]}…)"
        )
    return corpus


def _planned_steps(limits: Limits, batches: Batches) -> tuple[int | None, str | None]:
    """(planned number of steps, the limit that sets it) from --epochs / --max-steps."""
    options = []
    if limits.epochs is not None:
        options.append((sum(batches.batches_per_epoch(e) for e in range(limits.epochs)), "epochs"))
    if limits.max_steps is not None:
        options.append((limits.max_steps, "max_steps"))
    return min(options) if options else (None, None)
