"""The run's trainer/ subdirectory: what a resume needs beyond the best weights.

    trainer/
      state.json             run settings, limits, data position, counters, AdamW param groups
      model.safetensors      the latest weights (where a resume continues)
      optimizer.safetensors  AdamW moments and step counts, and the RNG states

safetensors holds flat name -> tensor maps, so the optimizer's nested state
is flattened to names "state.<param index>.<name>" and the RNG states to
"rng.<device>"; the param groups (plain numbers) go to state.json.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from training.atomic_dir import recover
from training.checkpoint import CheckpointError, read_config

TRAINER_DIR = "trainer"
STATE_FILE = "state.json"
LAST_WEIGHTS = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"

# What load_trainer returns: (state.json, last weights, AdamW + RNG tensors).
SavedTrainer = tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, torch.Tensor]]


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


def restore_optimizer(
    optimizer: torch.optim.Optimizer, groups: list[dict[str, Any]], tensors: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Load the optimizer state flattened by `optimizer_tensors`; return the RNG tensors."""
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


def save_trainer(
    directory: Path,
    state: dict[str, Any],
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    rng: dict[str, torch.Tensor],
) -> None:
    """Write the trainer/ directory: optimizer + RNG tensors, latest weights, state.json."""
    directory.mkdir(parents=True, exist_ok=True)
    tensors, groups = optimizer_tensors(optimizer, rng)
    save_file(tensors, str(directory / OPTIMIZER_FILE))
    weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(weights, str(directory / LAST_WEIGHTS))
    full = dict(state, optimizer_param_groups=groups)
    (directory / STATE_FILE).write_text(json.dumps(full, indent=2) + "\n", encoding="utf-8")


def load_trainer(out: Path) -> SavedTrainer:
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
