"""Atomic, resumable checkpoints.

``DIR/checkpoints/epoch_0003/`` holds everything needed to continue after epoch 3 exactly:
trainable weights (safetensors), optimizer state, stat-tracker buffers, RNG states, counters and
the resolved config. It is written to ``epoch_0003.tmp`` and renamed when complete, so a crash
never leaves a half checkpoint that resume would pick up. Nothing is unpickled: tensors load with
safetensors and the optimizer / RNG state with ``torch.load(weights_only=True)``.

``CheckpointWriter`` writes in a background thread (``train.async_checkpoint``): the trainer hands
it a ``CheckpointState`` whose tensors are copies, and goes on with the next epoch while the
files are written. A failed write is raised at the next ``submit`` or ``wait``; a process killed
mid-write leaves only a ``.tmp`` directory, so resume starts from the checkpoint before.
"""

from __future__ import annotations

import json
import os
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

PREFIX = "epoch_"


class ResumeError(RuntimeError):
    """A run directory cannot be started or resumed as asked."""


@dataclass
class CheckpointState:
    epoch: int  # last completed epoch (0-based)
    global_step: int
    weights: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    tracker: dict[str, Any] | None
    rng: dict[str, Any]
    config_yaml: str


def checkpoint_dirs(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary ``.tmp`` dirs are ignored)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    dirs = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()]
    return sorted(dirs, key=lambda p: int(p.name[len(PREFIX):]))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    dirs = [d for d in checkpoint_dirs(run_dir) if (d / "state.json").is_file()]
    return dirs[-1] if dirs else None


def save_checkpoint(run_dir: str | Path, state: CheckpointState, keep: int) -> Path:
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{state.epoch:04d}"
    tmp = root / f"{final.name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file({k: v.contiguous() for k, v in state.weights.items()}, str(tmp / "weights.safetensors"))
    torch.save(state.optimizer, tmp / "optimizer.pt")
    torch.save(state.rng, tmp / "rng.pt")
    if state.tracker is not None:
        tensors = {k: state.tracker[k] for k in ("buffer", "count", "cursor")}
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "stat_tracker.safetensors"))
        meta = {k: v for k, v in state.tracker.items() if k not in tensors}
        (tmp / "stat_tracker.json").write_text(json.dumps(meta))
    (tmp / "config.yaml").write_text(state.config_yaml)
    # state.json last: its presence marks the content complete even before the rename
    (tmp / "state.json").write_text(json.dumps({"epoch": state.epoch, "global_step": state.global_step}))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in checkpoint_dirs(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


class CheckpointWriter:
    """One checkpoint write at a time, in a background thread (or inline with ``background=False``)."""

    def __init__(self, background: bool = True) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint") if background else None
        self._pending: Future | None = None

    def submit(self, run_dir: str | Path, state: CheckpointState, keep: int) -> Path:
        """Write ``state`` (its tensors must not change afterwards); returns the final directory."""
        self.wait()
        final = Path(run_dir) / "checkpoints" / f"{PREFIX}{state.epoch:04d}"
        if self._pool is None:
            save_checkpoint(run_dir, state, keep)
        else:
            self._pending = self._pool.submit(save_checkpoint, run_dir, state, keep)
        return final

    def wait(self) -> None:
        """Block until the pending write is on disk; re-raise its error, if any."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            if self._pool is not None:
                self._pool.shutdown()


def load_checkpoint(path: str | Path) -> CheckpointState:
    path = Path(path)
    meta = json.loads((path / "state.json").read_text())
    tracker = None
    if (path / "stat_tracker.json").is_file():
        tracker = json.loads((path / "stat_tracker.json").read_text())
        tracker.update(load_file(str(path / "stat_tracker.safetensors")))
    return CheckpointState(
        epoch=meta["epoch"],
        global_step=meta["global_step"],
        weights=load_file(str(path / "weights.safetensors")),
        optimizer=torch.load(path / "optimizer.pt", weights_only=True),
        tracker=tracker,
        rng=torch.load(path / "rng.pt", weights_only=True),
        config_yaml=(path / "config.yaml").read_text(),
    )
