"""metrics.jsonl: the run's log points, one JSON object per line.

Train lines carry `train_loss`, validation lines `val_loss`; both carry `step`.
The whole list is rewritten at each save (it is small), so a resume reads
exactly the lines of the checkpoint it continues.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"


def read_metrics(out: Path) -> list[dict[str, Any]]:
    """The log points saved in run directory `out`; none when it has no metrics file."""
    path = Path(out) / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def write_metrics(directory: Path, metrics: list[dict[str, Any]]) -> None:
    """Write all log points to `directory`/metrics.jsonl."""
    lines = "".join(json.dumps(m) + "\n" for m in metrics)
    (directory / METRICS_FILE).write_text(lines, encoding="utf-8")
