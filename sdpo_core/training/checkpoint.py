"""Atomic, verified, resumable checkpoints.

``DIR/checkpoints/epoch_0003/`` holds everything needed to continue after epoch 3 exactly:
trainable weights (safetensors), the copies of them a run keeps (old policy, KL reference, EMA:
``snapshot_NAME.safetensors``), optimizer state, stat-tracker buffers, RNG states, counters and
the resolved config. It is written to ``epoch_0003.tmp``; ``manifest.json`` (every file's size and
sha256) is written LAST, the files are fsynced and the directory is renamed into place. Resume
verifies a checkpoint against its manifest before loading it: a checkpoint without one, or whose
files are truncated or changed, is skipped with a warning and the newest good one is used.
Nothing is unpickled: tensors load with safetensors and the optimizer / RNG state with
``torch.load(weights_only=True)``.

Under FSDP (``sharding.py``) the trained weights and the optimizer state are written by every
process, each its own shard, into ``epoch_0003.tmp/sharded/`` before the main process writes the
rest; the manifest then lists every file, the shards included (``sharded/__0_0.distcp``, ...).

``CheckpointWriter`` writes in a background thread (``train.async_checkpoint``): the trainer hands
it a ``CheckpointState`` whose tensors are copies, and goes on with the next epoch while the
files are written. A failed write (e.g. a full disk: ``CheckpointWriteError``, which says how much
space was needed; or weights holding NaN or infinite values, which are never written) removes its
``.tmp`` directory and is raised at the next ``submit`` or ``wait``;
a process killed mid-write leaves only a ``.tmp`` directory. Either way the previous checkpoint
stays the one resume starts from.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file, save_file

from sdpo_core.rundir.atomic import fsync_dir, fsync_tree
from sdpo_core.training.nonfinite import nonfinite_names

log = logging.getLogger(__name__)
PREFIX = "epoch_"
MANIFEST = "manifest.json"
SNAPSHOT = "snapshot_"
CORRUPT_SUFFIX = ".corrupt"
SHARDED_DIR = "sharded"  # the DCP folder of a sharded checkpoint (weights + optimizer, one file per process)
# config keys that fix the shape or the meaning of the saved state: resume refuses a change
STATE_KEYS = (
    "model.finetune", "model.lora_rank", "model.lora_alpha", "model.lora_target_modules",
    "sample.num_steps", "train.method", "train.stat_tracking.enabled", "train.stat_tracking.buffer_size",
)


class ResumeError(RuntimeError):
    """A run directory cannot be started or resumed as asked."""


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (the previous one is intact)."""


@dataclass
class CheckpointState:
    epoch: int  # last completed epoch (0-based)
    global_step: int
    weights: dict[str, torch.Tensor] | None  # None when sharded: the processes wrote them in SHARDED_DIR
    optimizer: dict[str, Any] | None
    tracker: dict[str, Any] | None
    rng: dict[str, Any]
    config_yaml: str
    # copies of the weights the run keeps (training/weights.py): name -> weights
    snapshots: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    sharded: bool = False


def checkpoint_dirs(run_dir: str | Path) -> list[Path]:
    """Checkpoint directories, oldest first (``.tmp`` and ``.corrupt`` ones are ignored; not verified)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    dirs = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()]
    return sorted(dirs, key=lambda p: int(p.name[len(PREFIX):]))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify_checkpoint(path: str | Path) -> str | None:
    """None if every file in ``path``'s manifest has its recorded size and sha256; else what is wrong."""
    path = Path(path)
    try:
        files = json.loads((path / MANIFEST).read_text())["files"]
    except FileNotFoundError:
        return f"no {MANIFEST} (the write did not finish, or an older sdpo wrote it)"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"{MANIFEST} is unreadable ({exc})"
    for name, want in files.items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        size = f.stat().st_size
        if size != want["bytes"]:
            return f"{name} has {size} bytes, the manifest says {want['bytes']} (truncated or overwritten)"
        if _sha256(f) != want["sha256"]:
            return f"{name} does not match its sha256 in the manifest (corrupted)"
    return None


def scan_checkpoints(run_dir: str | Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """(newest checkpoint that verifies, [(newer checkpoint that does not, why), ...])."""
    bad: list[tuple[Path, str]] = []
    for d in reversed(checkpoint_dirs(run_dir)):
        problem = verify_checkpoint(d)
        if problem is None:
            return d, bad
        bad.append((d, problem))
    return None, bad


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest checkpoint that verifies; newer ones that do not are logged and skipped."""
    good, bad = scan_checkpoints(run_dir)
    for d, problem in bad:
        log.warning("skipping checkpoint %s: %s", d, problem)
    return good


def set_aside(path: Path) -> Path:
    """Rename a bad checkpoint to ``epoch_NNNN.corrupt`` (kept for inspection, never loaded)."""
    target = path.with_name(path.name + CORRUPT_SUFFIX)
    if target.exists():
        shutil.rmtree(target)
    os.replace(path, target)
    return target


def _nbytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v) for v in obj)
    return 0


def _write_files(tmp: Path, state: CheckpointState) -> None:
    if state.weights is not None:  # else sharded: in tmp/sharded already
        save_file({k: v.contiguous() for k, v in state.weights.items()}, str(tmp / "weights.safetensors"))
        torch.save(state.optimizer, tmp / "optimizer.pt")
    for name, weights in state.snapshots.items():
        save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp / f"{SNAPSHOT}{name}.safetensors"))
    torch.save(state.rng, tmp / "rng.pt")
    if state.tracker is not None:
        tensors = {k: state.tracker[k] for k in ("buffer", "count", "cursor")}
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "stat_tracker.safetensors"))
        meta = {k: v for k, v in state.tracker.items() if k not in tensors}
        (tmp / "stat_tracker.json").write_text(json.dumps(meta))
    (tmp / "config.yaml").write_text(state.config_yaml)
    (tmp / "state.json").write_text(json.dumps({"epoch": state.epoch, "global_step": state.global_step}))
    files = {p.relative_to(tmp).as_posix(): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
             for p in sorted(tmp.rglob("*")) if p.is_file()}
    # the manifest last: a checkpoint without one is incomplete
    (tmp / MANIFEST).write_text(json.dumps({"epoch": state.epoch, "files": files}, indent=1))
    fsync_tree(tmp)


def save_checkpoint(run_dir: str | Path, state: CheckpointState, keep: int) -> Path:
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{state.epoch:04d}"
    # sharded weights are checked by the processes before writing
    bad = nonfinite_names(state.weights or {}) + [
        f"{n}:{k}" for n, w in state.snapshots.items() for k in nonfinite_names(w)
    ]
    if bad:  # before anything is written or pruned: the last good checkpoint stays the newest
        previous = latest_checkpoint(run_dir)
        raise CheckpointWriteError(
            f"checkpoint {final.name} was not written: {len(bad)} weight tensor(s) hold NaN or infinite values "
            f"({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}). "
            + (f"The last good checkpoint {previous} is intact: continue from it with --resume"
               if previous else "There is no earlier checkpoint")
        )
    tmp = root / f"{final.name}.tmp"
    if tmp.exists() and not state.sharded:  # sharded: the shards are in it already (sharding.write_shards)
        shutil.rmtree(tmp)
    try:
        tmp.mkdir(exist_ok=state.sharded)
        _write_files(tmp, state)
    except Exception as exc:  # OSError, and the writers' own wrappers of it (SafetensorError, torch's RuntimeError)
        shutil.rmtree(tmp, ignore_errors=True)
        previous = latest_checkpoint(run_dir)
        need = (_nbytes(state.weights) + _nbytes(state.snapshots) + _nbytes(state.optimizer) + _nbytes(state.tracker)
                + (1 << 16)) / 1e6
        free = shutil.disk_usage(root).free / 1e6
        reason = getattr(exc, "strerror", None) or str(exc).strip().splitlines()[0]
        full = "the disk is full (No space left on device); " if free < need else ""
        raise CheckpointWriteError(
            f"checkpoint {final.name} could not be written in {root}: {full}{reason}. It needs about "
            f"{need:.1f} MB; {free:.1f} MB are free there. "
            + (f"The previous checkpoint {previous.name} is intact: free some space, then continue with --resume"
               if previous else "There is no earlier checkpoint: free some space and start again")
        ) from exc
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(root)
    for old in checkpoint_dirs(run_dir)[:-keep]:  # `final` is the newest, and good: never pruned
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


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_compatible(path: str | Path, config_yaml: str) -> None:
    """Raise ResumeError if the checkpoint's config differs from ``config_yaml`` in a STATE_KEYS key."""
    path = Path(path)
    try:
        old = _flatten(yaml.safe_load((path / "config.yaml").read_text()))
    except (OSError, yaml.YAMLError, AttributeError) as exc:
        raise ResumeError(f"{path / 'config.yaml'} cannot be read ({exc}); start a new run with another --run-dir") from exc
    new = _flatten(yaml.safe_load(config_yaml))
    missing = "(absent)"
    diffs = [(k, old.get(k, missing), new.get(k, missing)) for k in STATE_KEYS if old.get(k, missing) != new.get(k, missing)]
    if diffs:
        lines = "\n".join(f"  {k}: {o!r} in the checkpoint, {n!r} now" for k, o, n in diffs)
        sets = " ".join(f"--set {k}={yaml.safe_dump(o, default_flow_style=True).strip().removesuffix('...').strip()}"
                        for k, o, _ in diffs)
        raise ResumeError(
            f"cannot resume from {path}: the config changed in keys that fix the saved state\n{lines}\n"
            f"resume with the checkpoint's values ({sets}), or start a new run with another --run-dir"
        )


def plan_resume(run_dir: str | Path, config_yaml: str, resume: bool) -> tuple[Path | None, list[tuple[Path, str]]]:
    """Where a run in ``run_dir`` starts: (checkpoint to load or None, newer bad checkpoints to skip).

    Raises ResumeError, before anything is built or written, when the run cannot start as asked:
    checkpoints exist without ``resume``; ``resume`` but no checkpoint verifies; or the config
    changed in a key that fixes the saved state (STATE_KEYS).
    """
    run_dir = Path(run_dir)
    existing = checkpoint_dirs(run_dir)
    if not resume:
        if existing:
            raise ResumeError(
                f"{run_dir} already holds checkpoints (latest {existing[-1].name}); pass --resume to continue "
                "it, or choose another --run-dir"
            )
        return None, []
    good, bad = scan_checkpoints(run_dir)
    if good is None and bad:
        found = "; ".join(f"{d.name}: {why}" for d, why in bad)
        raise ResumeError(
            f"--resume: no checkpoint in {run_dir / 'checkpoints'} is complete ({found}); remove that folder "
            "to start over, or choose another --run-dir"
        )
    if good is not None:
        check_compatible(good, config_yaml)
    return good, bad


def load_checkpoint(path: str | Path) -> CheckpointState:
    path = Path(path)
    current = "state.json"
    try:
        meta = json.loads((path / "state.json").read_text())
        tracker = None
        if (path / "stat_tracker.json").is_file():
            current = "stat_tracker.json"
            tracker = json.loads((path / "stat_tracker.json").read_text())
            current = "stat_tracker.safetensors"
            tracker.update(load_file(str(path / "stat_tracker.safetensors")))
        sharded = (path / SHARDED_DIR).is_dir()  # then the weights and optimizer load into the live model
        weights = optimizer = None
        if not sharded:
            current = "weights.safetensors"
            weights = load_file(str(path / "weights.safetensors"))
            current = "optimizer.pt"
            optimizer = torch.load(path / "optimizer.pt", weights_only=True)
        snapshots = {}
        for f in sorted(path.glob(f"{SNAPSHOT}*.safetensors")):
            current = f.name
            snapshots[f.name[len(SNAPSHOT):-len(".safetensors")]] = load_file(str(f))
        current = "rng.pt"
        rng = torch.load(path / "rng.pt", weights_only=True)
        current = "config.yaml"
        config_yaml = (path / "config.yaml").read_text()
    except Exception as exc:  # noqa: BLE001 - any unreadable file: one clear message
        raise ResumeError(
            f"{path / current} cannot be read ({type(exc).__name__}: {exc}); remove {path} to resume from "
            "the checkpoint before it, or start a new run with another --run-dir"
        ) from exc
    return CheckpointState(
        epoch=meta["epoch"], global_step=meta["global_step"], weights=weights, optimizer=optimizer,
        tracker=tracker, rng=rng, config_yaml=config_yaml, snapshots=snapshots, sharded=sharded,
    )
