"""Checkpoint directory: config.json, vocab.json, model.safetensors.

Loading runs no pickled code: weights are safetensors, the rest is JSON.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from training.model import CharGRU, ModelConfig
from training.vocab import Vocab, VocabError

CONFIG_FILE = "config.json"
VOCAB_FILE = "vocab.json"
WEIGHTS_FILE = "model.safetensors"


class CheckpointError(RuntimeError):
    """A checkpoint directory that is missing, incomplete or inconsistent."""


def save_model(
    directory: Path, model: CharGRU, vocab: Vocab, training: dict[str, Any] | None = None
) -> None:
    """Write config.json (model config + `training` facts), vocab.json and weights."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = model.config.to_dict()
    config["training"] = training or {}
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(directory / WEIGHTS_FILE))
    vocab.save(directory / VOCAB_FILE)
    # config.json last: its presence marks a complete checkpoint.
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def read_config(directory: Path) -> dict[str, Any]:
    path = Path(directory) / CONFIG_FILE
    if not Path(directory).is_dir():
        raise CheckpointError(f"checkpoint directory not found: {directory}")
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: not a complete checkpoint directory")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    return data


def load_model(
    directory: Path, device: torch.device | str = "cpu"
) -> tuple[CharGRU, Vocab, dict[str, Any]]:
    """Load (model in eval mode, vocab, full config dict) from a checkpoint directory."""
    directory = Path(directory)
    data = read_config(directory)
    try:
        config = ModelConfig.from_dict(data)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{directory / CONFIG_FILE}: bad model config: {exc}") from exc
    try:
        vocab = Vocab.load(directory / VOCAB_FILE)
    except FileNotFoundError as exc:
        raise CheckpointError(f"{directory / VOCAB_FILE} is missing") from exc
    except VocabError as exc:
        raise CheckpointError(f"{directory / VOCAB_FILE}: {exc}") from exc
    if len(vocab) != config.vocab_size:
        raise CheckpointError(
            f"vocab.json has {len(vocab)} characters but config.json says "
            f"vocab_size={config.vocab_size}"
        )
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{weights} is missing")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{weights} is not a readable safetensors file: {exc}") from exc
    model = CharGRU(config)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{weights} does not match config.json: {exc}") from exc
    return model.to(device).eval(), vocab, data
