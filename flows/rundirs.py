"""Where a flow run trains, and whether it may start there.

The run directory is the flow's ``run_dir`` parameter, else ``<runs_root>/<pipeline>``
(orchestration.yaml ``runs_root``: a folder outside the checkout, kept when a worker's temporary
clone goes), else the checkout's ``runs/<pipeline>`` (the DVC outs).

Before any stage runs, :func:`start_mode` decides what training does with what an earlier run left
there (checkpoints, final weights, metrics):

- nothing there: ``new``;
- left by an earlier attempt of this same flow run (a retry: Prefect's ``retries``, *Retry* in the
  UI, ``prefect flow-run retry``; the train task records its flow run in ``RUN_DIR/OWNER_FILE``):
  ``resume`` from the last complete checkpoint, whatever the flags say;
- ``fresh=true``: ``fresh`` (the train task deletes them, then trains from scratch);
- ``resume=true``: ``resume``;
- neither: :class:`RunDirRefused`, naming both ways out. A new run never deletes checkpoints
  silently (a cancelled run's are what the next one resumes from).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Literal

from sdpo_core.rundir.outputs import TRAIN_OUTPUTS, clear_train_outputs
from sdpo_core.rundir.paths import default_run_dir
from sdpo_core.training.checkpoint import checkpoint_dirs, latest_checkpoint

OWNER_FILE = "prefect_flow_run.json"
StartMode = Literal["new", "fresh", "resume"]


class RunDirRefused(ValueError):
    """A new flow run would overwrite (or silently continue) an earlier run's training."""


def run_dir_for(pipeline: str, run_dir: str | None, runs_root: Path | None) -> Path:
    """The flow's run directory: ``run_dir`` as given, ``<runs_root>/<pipeline>``, or ``runs/<pipeline>``."""
    if run_dir:
        return Path(run_dir).expanduser()
    if runs_root is not None:
        return runs_root / pipeline
    return default_run_dir(pipeline)


def leftovers(run_dir: Path) -> list[str]:
    """The training outputs an earlier run left in ``run_dir`` (the newest checkpoint named)."""
    found = [name for name in TRAIN_OUTPUTS if (run_dir / name).exists()]
    ckpts = checkpoint_dirs(run_dir)
    return [f"checkpoints/{ckpts[-1].name}" if name == "checkpoints" and ckpts else name for name in found]


def owner(run_dir: Path) -> str | None:
    """The flow run id that last trained in ``run_dir`` (None: none recorded, or unreadable)."""
    try:
        return str(json.loads((run_dir / OWNER_FILE).read_text(encoding="utf-8"))["flow_run_id"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def claim(run_dir: Path, flow_run_id: str, flow_run_name: str) -> None:
    """Record that this flow run trains in ``run_dir`` (what a retry of it recognises)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    record = {"flow_run_id": flow_run_id, "flow_run_name": flow_run_name,
              "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    (run_dir / OWNER_FILE).write_text(json.dumps(record), encoding="utf-8")


def start_mode(run_dir: Path, flow_run_id: str, *, resume: bool, fresh: bool) -> StartMode:
    """How this flow run's training starts in ``run_dir`` (module docstring); RunDirRefused if it may not."""
    if resume and fresh:
        raise RunDirRefused("resume=true and fresh=true exclude each other: pass one of them")
    found = leftovers(run_dir)
    if not found:
        return "new"
    previous = owner(run_dir)
    if previous == flow_run_id:
        return "resume"
    if fresh:
        return "fresh"
    if resume:
        return "resume"
    by = f" by flow run {previous}" if previous else ""
    raise RunDirRefused(
        f"{run_dir} holds the training of an earlier run{by} ({', '.join(found)}): pass resume=true to "
        "continue it from its last checkpoint, or fresh=true to delete it and start over"
    )


def begin_training(run_dir: Path, start: StartMode, flow_run_id: object, flow_run_name: object, attempt: int,
                   log: logging.Logger | logging.LoggerAdapter) -> bool:
    """What the train task does first: clear or keep the earlier training as ``start`` says, and
    record this flow run as the run directory's trainer (what a retry of it resumes); returns whether
    training resumes. ``resume`` without any checkpoint trains from scratch (stale outputs deleted)."""
    if start == "resume" and not checkpoint_dirs(run_dir):
        log.info("resume: no checkpoint in %s, training from scratch", run_dir)
        start = "fresh"
    if start == "resume":
        log.info("flow run attempt %d: resuming from %s", attempt, latest_checkpoint(run_dir))
    elif start == "fresh":
        clear_train_outputs(run_dir)
        log.info("deleted the earlier training in %s; training from scratch", run_dir)
    claim(run_dir, str(flow_run_id), str(flow_run_name))
    return start == "resume"
