"""What a save keeps of a run, and how a resume puts it back.

train.py runs the loop; this module owns what crosses a checkpoint:
`Progress` (the counters), the RNG states, the facts in config.json, the
trainer state, and the best weights so far. The best weights stay in memory
between saves because the directory's model.safetensors holds the weights
with the best validation loss, not the latest ones.

The run directory `RunSaver` writes:

    OUT/
      config.json          model config + "training" facts (training.checkpoint)
      vocab.json           the characters; index = token id
      model.safetensors    the weights with the best validation loss so far
      metrics.jsonl        one JSON object per log point (training.metrics_log)
      loss.png             train/validation loss over steps (training.loss_plot)
      trainer/             what a resume needs (training.trainer_dir)

Every save builds a complete new directory and swaps it in
(training.atomic_dir), so OUT is always either the previous complete
checkpoint or the new one.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from training.atomic_dir import recover, write_atomically
from training.checkpoint import WEIGHTS_FILE, CheckpointError, save_model
from training.corpus import Corpus
from training.loss_plot import PLOT_FILE, plot_losses
from training.metrics_log import read_metrics, write_metrics
from training.model import CharGRU, ModelConfig
from training.settings import Limits, Settings
from training.trainer_dir import (
    TRAINER_DIR,
    SavedTrainer,
    load_trainer,
    restore_optimizer,
    save_trainer,
)
from training.vocab import Vocab

LN2 = math.log(2.0)


@dataclass
class Progress:
    """Counters that a checkpoint carries over to a resume."""

    step: int = 0
    epoch: int = 0
    batch_index: int = 0
    tokens_seen: int = 0
    train_seconds: float = 0.0
    best_val_loss: float | None = None
    best_step: int | None = None
    last_val_loss: float | None = None
    last_eval_step: int | None = None
    stop_reason: str | None = None
    log_loss_sum: float = 0.0  # train loss summed since the last metrics line
    log_steps: int = 0
    metrics: list[dict[str, Any]] = field(default_factory=list)


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(rng: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(rng["cpu"])
    if device.type == "cuda" and "cuda" in rng:
        torch.cuda.set_rng_state(rng["cuda"], device)


def load_progress(resume_from: Path) -> tuple[Progress, SavedTrainer]:
    """The counters and metrics of the run saved in `resume_from`, and its trainer state."""
    saved = load_trainer(resume_from)
    stored = saved[0]["progress"]
    prog = Progress(**{f.name: stored[f.name] for f in fields(Progress) if f.name in stored})
    prog.metrics = read_metrics(resume_from)
    return prog, saved


def restore_run(
    saved: SavedTrainer,
    resume_from: Path,
    model: CharGRU,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
) -> dict[str, torch.Tensor]:
    """Put back the latest weights, AdamW's state and the RNG states; returns the best weights."""
    state, weights, tensors = saved
    model.load_state_dict(weights)
    _set_rng_state(restore_optimizer(optimizer, state["optimizer_param_groups"], tensors), device)
    return _read_best(resume_from)


def _read_best(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(out / WEIGHTS_FILE))
    except Exception as exc:  # noqa: BLE001  any unreadable file is one error to the user
        raise CheckpointError(f"{out / WEIGHTS_FILE} is unreadable: {exc}") from exc


def load_run_settings(out: Path) -> tuple[Settings, Limits]:
    """The settings and limits a run directory was saved with."""
    recover(Path(out))
    state, _, _ = load_trainer(out)
    try:
        return Settings(**state["settings"]), Limits(**state["limits"])
    except (KeyError, TypeError, ValueError) as exc:  # ValueError: Settings checks the model size
        raise CheckpointError(f"{out}/{TRAINER_DIR}/state.json is not a trainer state: {exc}") from exc


class RunSaver:
    """Writes the run directory `out` at each checkpoint, atomically (atomic_dir.write_atomically)."""

    def __init__(
        self,
        out: Path,
        *,
        settings: Settings,
        limits: Limits,
        corpus: Corpus,
        train_chars: int,
        val_chars: int,
        vocab: Vocab,
        model_config: ModelConfig,
        model: CharGRU,
        optimizer: torch.optim.Optimizer,
        device: torch.device,
        best_weights: dict[str, torch.Tensor] | None = None,
    ) -> None:
        self.out = out
        self.settings, self.limits = settings, limits
        self.corpus_source = corpus.source
        self.train_chars = train_chars
        self.vocab, self.model_config = vocab, model_config
        self.model, self.optimizer, self.device = model, optimizer, device
        self.best_weights = best_weights
        # The facts in config.json that do not change during the run.
        self.facts_base: dict[str, Any] = {
            "corpus": {
                "source": corpus.source,
                "sha256": corpus.sha256,
                "chars": corpus.chars,
                "train_chars": train_chars,
                "val_chars": val_chars,
            },
            "settings": asdict(settings),
            "device": device.type,
            "torch": torch.__version__,
        }

    def save(self, prog: Progress) -> None:
        """Save the run as it stands at `prog.step`: best weights, trainer state, metrics, plot."""
        current = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
        if self.best_weights is None or prog.best_step == prog.step:
            self.best_weights = current
        best_weights = self.best_weights
        weights_step = prog.best_step if prog.best_step is not None else prog.step
        facts = {
            **self.facts_base,
            "steps": prog.step,
            "tokens_seen": prog.tokens_seen,
            "epochs": round(prog.tokens_seen / self.train_chars, 3),
            "train_seconds": round(prog.train_seconds, 1),
            "stop_reason": prog.stop_reason,
            "weights_step": weights_step,
            "val_loss": prog.best_val_loss,
            "val_bpc": None if prog.best_val_loss is None else prog.best_val_loss / LN2,
            "last_val_loss": prog.last_val_loss,
        }
        state = {
            "settings": asdict(self.settings),
            "limits": asdict(self.limits),
            "corpus": self.facts_base["corpus"],
            "progress": {f.name: getattr(prog, f.name) for f in fields(Progress) if f.name != "metrics"},
        }

        rng = _rng_state(self.device)

        def write(tmp: Path) -> None:
            with torch.random.fork_rng(devices=[]):  # building a module draws random init
                best_model = CharGRU(self.model_config)
            best_model.load_state_dict(best_weights)
            save_model(tmp, best_model, self.vocab, facts)
            save_trainer(tmp / TRAINER_DIR, state, self.model, self.optimizer, rng)
            write_metrics(tmp, prog.metrics)
            plot_losses(tmp / PLOT_FILE, prog.metrics, title=f"{self.corpus_source}: {prog.step} steps")

        write_atomically(self.out, write)
