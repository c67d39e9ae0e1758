"""The training run directory: the checkpoint plus what a resume needs.

    OUT/
      config.json          model config + "training" facts (training.checkpoint)
      vocab.json           the characters; index = token id
      model.safetensors    the weights with the best validation loss so far
      metrics.jsonl        one JSON object per log point
      loss.png             train/validation loss over steps
      trainer/
        state.json         run settings, limits, data position, counters
        model.safetensors  the latest weights (where a resume continues)
        optimizer.safetensors  AdamW moments and the RNG states

Every save writes a complete new directory next to OUT and swaps it in with
two renames, so OUT is always either the previous complete checkpoint or the
new one. If a crash falls between the renames, OUT is missing and the
previous checkpoint waits in .OUT.old, which `recover` puts back.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from training.checkpoint import CheckpointError, read_config

TRAINER_DIR = "trainer"
STATE_FILE = "state.json"
LAST_WEIGHTS = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"


def _partial(out: Path) -> Path:
    return out.with_name(f".{out.name}.partial")


def _old(out: Path) -> Path:
    return out.with_name(f".{out.name}.old")


def recover(out: Path) -> None:
    """Put back the previous checkpoint if a save died between its two renames."""
    if not out.exists() and _old(out).is_dir():
        os.rename(_old(out), out)


def write_atomically(out: Path, write: Callable[[Path], None]) -> None:
    """Call write(tmpdir) to fill a fresh directory, then swap it in as `out`."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _partial(out)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    write(tmp)
    _fsync_tree(tmp)
    old = _old(out)
    if out.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.rename(out, old)
    os.rename(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def _fsync_tree(root: Path) -> None:
    """Flush files (and, where the OS allows, directories) to disk before the swap."""
    o_directory = getattr(os, "O_DIRECTORY", None)
    for path in [*root.rglob("*"), root]:
        if path.is_dir() and o_directory is None:
            continue
        fd = os.open(path, os.O_RDONLY | (o_directory if path.is_dir() else 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# --- trainer state -------------------------------------------------------------


def optimizer_tensors(
    optimizer: torch.optim.Optimizer, rng: dict[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """Flatten an optimizer state_dict (+ RNG states) to safetensors tensors and JSON groups."""
    sd = optimizer.state_dict()
    tensors = {
        f"state.{index}.{name}": value.detach().cpu().contiguous()
        for index, entry in sd["state"].items()
        for name, value in entry.items()
    }
    tensors.update({f"rng.{name}": value.cpu() for name, value in rng.items()})
    return tensors, sd["param_groups"]


def save_trainer(
    directory: Path,
    state: dict[str, Any],
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    rng: dict[str, torch.Tensor],
) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    tensors, groups = optimizer_tensors(optimizer, rng)
    save_file(tensors, str(directory / OPTIMIZER_FILE))
    weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(weights, str(directory / LAST_WEIGHTS))
    full = dict(state, optimizer_param_groups=groups)
    (directory / STATE_FILE).write_text(json.dumps(full, indent=2) + "\n", encoding="utf-8")


def load_trainer(out: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, Any]]:
    """(state, last weights, optimizer/RNG tensors) from a run directory."""
    out = Path(out)
    recover(out)
    read_config(out)  # raises CheckpointError for a missing or incomplete directory
    directory = out / TRAINER_DIR
    try:
        state = json.loads((directory / STATE_FILE).read_text(encoding="utf-8"))
        weights = load_file(str(directory / LAST_WEIGHTS))
        tensors = load_file(str(directory / OPTIMIZER_FILE))
    except FileNotFoundError as exc:
        raise CheckpointError(
            f"{out} has no resumable trainer state ({exc.filename} is missing)"
        ) from exc
    except (ValueError, SafetensorError, OSError) as exc:
        raise CheckpointError(f"{out}/{TRAINER_DIR} is unreadable: {exc}") from exc
    return state, weights, tensors


def restore_optimizer(
    optimizer: torch.optim.Optimizer, groups: list[dict[str, Any]], tensors: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Load the optimizer state; return the RNG tensors."""
    state: dict[int, dict[str, torch.Tensor]] = {}
    rng: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        kind, _, rest = key.partition(".")
        if kind == "rng":
            rng[rest] = value
        else:
            index, _, name = rest.partition(".")
            state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    return rng


# --- metrics and plot ----------------------------------------------------------


def read_metrics(out: Path) -> list[dict[str, Any]]:
    path = Path(out) / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def write_metrics(directory: Path, metrics: list[dict[str, Any]]) -> None:
    lines = "".join(json.dumps(m) + "\n" for m in metrics)
    (directory / METRICS_FILE).write_text(lines, encoding="utf-8")


def plot_losses(path: Path, metrics: list[dict[str, Any]], title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(m["step"], m["train_loss"]) for m in metrics if "train_loss" in m]
    val = [(m["step"], m["val_loss"]) for m in metrics if "val_loss" in m]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train", linewidth=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation", markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/char)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
