"""loss.png: train and validation loss over steps, drawn from the metrics log."""

from __future__ import annotations

from pathlib import Path
from typing import Any

PLOT_FILE = "loss.png"


def plot_losses(path: Path, metrics: list[dict[str, Any]], title: str = "") -> None:
    """Draw the train and validation losses of `metrics` (see metrics_log) to a PNG at `path`."""
    # Imported here: matplotlib is slow to import and only a save needs it.
    import matplotlib

    matplotlib.use("Agg")  # no display: write files only
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
