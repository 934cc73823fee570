"""Training outputs in the shapes the orchestration tools read (flows/ and dvc.yaml)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

# what a previous training left in the run dir that would make a new one refuse (or resume)
TRAIN_OUTPUTS = ("final", "checkpoints", "train_metrics.jsonl", "train_metrics.csv")


def clear_train_outputs(run_dir: str | Path) -> None:
    """Remove a previous training's outputs, as DVC does before it reruns the train stage: a new
    run in the same stable run dir starts from scratch instead of refusing (or resuming) old
    checkpoints."""
    for name in TRAIN_OUTPUTS:
        path = Path(run_dir) / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def export_train_metrics(run_dir: str | Path) -> Path:
    """RUN_DIR/train_metrics.jsonl -> RUN_DIR/train_metrics.csv (one row per epoch): DVC plots read
    CSV/JSON/YAML but not JSON lines."""
    src = Path(run_dir) / "train_metrics.jsonl"
    rows = [json.loads(line) for line in src.read_text(encoding="utf-8").splitlines() if line.strip()]
    columns = ["epoch", *sorted({k for row in rows for k in row} - {"epoch"})]
    out = src.with_suffix(".csv")
    with open(out, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return out
