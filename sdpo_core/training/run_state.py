"""The run directory's state: preparing it (and resuming), the training state a checkpoint holds,
and the metrics file ``train_metrics.jsonl`` (one JSON line per epoch).

The checkpoint files themselves (atomic writes, manifests, verification) are ``checkpoint.py``'s.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from peft.utils import set_peft_model_state_dict
from torch.distributed.checkpoint import CheckpointException

from sdpo_core.rundir.atomic import atomic_write_text
from sdpo_core.training import checkpoint as ckpt
from sdpo_core.training import sharding
from sdpo_core.training.checkpoint import CheckpointState, ResumeError

log = logging.getLogger(__name__)
METRICS_FILE = "train_metrics.jsonl"


def to_cpu_copy(obj: Any) -> Any:
    """A copy of ``obj`` (nested dicts / lists / tuples of tensors) that owns CPU memory."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: to_cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu_copy(v) for v in obj)
    return obj


def prepare_run_dir(run_dir: Path, config_yaml: str, resume: bool, acc: Accelerator,
                    load: Callable[[Path], int]) -> int:
    """Check the run dir (ResumeError before anything is written), ``load`` the checkpoint to
    resume (it returns the epoch to start at), write config.yaml; returns the start epoch."""
    latest, bad = ckpt.plan_resume(run_dir, config_yaml, resume)
    if resume and latest is None:
        log.warning("--resume: no checkpoint in %s, starting from scratch", run_dir)
    start = load(latest) if latest is not None else 0
    acc.wait_for_everyone()  # every process has read the checkpoints before any is renamed
    if acc.is_main_process:
        for path, problem in bad:  # newer than `latest` and unusable: out of resume's (and pruning's) way
            log.warning("skipping checkpoint %s: %s; moved to %s", path, problem, ckpt.set_aside(path).name)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(config_yaml)
        if start:
            drop_metrics_from(run_dir, start)
            log.info("resumed from %s: starting at epoch %d", latest, start)
    return start


def _epoch_of(metrics_line: str) -> float:
    try:
        return json.loads(metrics_line)["epoch"]
    except (ValueError, KeyError, TypeError):
        return math.inf


def drop_metrics_from(run_dir: Path, epoch: int) -> None:
    """Forget metrics lines of epochs >= ``epoch`` (logged before a stop, trained again now)."""
    path = run_dir / METRICS_FILE
    if not path.is_file():
        return
    lines = [x for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]
    kept = [x for x in lines if _epoch_of(x) < epoch]  # a half-written last line goes too
    if len(kept) < len(lines):
        atomic_write_text(path, "".join(x + "\n" for x in kept))


def append_metrics(run_dir: Path, metrics: dict[str, float]) -> None:
    """One epoch's line of train_metrics.jsonl."""
    with open(run_dir / METRICS_FILE, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(metrics) + "\n")


def check_sharding(path: Path, checkpoint_sharded: bool, run_sharded: bool) -> None:
    """ResumeError when a sharded (FSDP) checkpoint would resume an unsharded run or the other way round."""
    if checkpoint_sharded == run_sharded:
        return
    how = ("by every process of an FSDP run" if checkpoint_sharded else "by a run without FSDP")
    start = ("with an FSDP accelerate config (accelerate launch --config_file configs/accelerate/fsdp_*.yaml; "
             "any number of processes)" if checkpoint_sharded else "without FSDP (a DDP or single-GPU config)")
    raise ResumeError(f"{path} was written {how}: resume it {start}, or start a new run with another --run-dir")


def restore(path: Path, state: CheckpointState, denoiser: torch.nn.Module, finetune: str,
            optimizer: torch.optim.Optimizer, stat_tracker: Any) -> None:
    """Load a checkpoint's weights, optimizer and stat tracker (ResumeError when they do not fit).
    ``denoiser``: as prepared when sharded (DCP then reshards to this run's processes)."""
    try:
        if state.weights is None or state.optimizer is None:  # sharded: read from its DCP files
            sharding.load_sharded(path / ckpt.SHARDED_DIR, denoiser, optimizer)
        else:
            if finetune == "lora":
                result = set_peft_model_state_dict(denoiser, state.weights)
                if getattr(result, "unexpected_keys", None):
                    raise ResumeError(f"{path}: checkpoint LoRA keys do not match this model")
            else:
                denoiser.load_state_dict(state.weights)
            optimizer.load_state_dict(state.optimizer)
        if stat_tracker is not None and state.tracker is not None:
            stat_tracker.load_state_dict(state.tracker)
    except (RuntimeError, ValueError, KeyError, CheckpointException) as exc:
        if isinstance(exc, ResumeError):
            raise
        # a change check_compatible does not know about: still one message, not a traceback
        raise ResumeError(
            f"{path} does not fit this run's model or optimizer ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0]}); compare {path / 'config.yaml'} with this run's config, "
            "or start a new run with another --run-dir"
        ) from exc
