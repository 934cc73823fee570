"""The stages of a run as plain functions: the CLI and the Prefect tasks both call these.

Each stage reads and writes fixed paths under the run directory (``runs/<pipeline>`` by
default), which are also the ``outs`` of the DVC stages. Every stage that writes there holds the
run directory's lock (``runlock.py``): a second run on the same directory fails at once.

    RUN_DIR/prompts/{train,eval}.txt, manifest.json   prepare
    model.pretrained (embedded builders only)         base
    RUN_DIR/final/, checkpoints/, config.yaml         train
    RUN_DIR/eval/eval.json, reward_vs_steps.png, grid.png   evaluate
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from sdpo_core.config import Config
from sdpo_core.rundir.lock import run_lock
from sdpo_core.tracking.trackers import NullTracker, Tracker

log = logging.getLogger(__name__)


def prompts_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "prompts"


def eval_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "eval"


def prepare_stage(cfg: Config, run_dir: str | Path):
    """Write the cleaned train/eval prompt split; returns the PromptSplit."""
    from sdpo_core.prompts import prepare

    with run_lock(run_dir):
        return prepare(cfg.prompts, prompts_dir(run_dir))


def load_or_prepare(cfg: Config, run_dir: str | Path):
    from sdpo_core.prompts import load_split

    if (prompts_dir(run_dir) / "manifest.json").is_file():
        return load_split(prompts_dir(run_dir))
    return prepare_stage(cfg, run_dir)


def base_stage(cfg: Config, force: bool = False) -> str:
    from sdpo_core.tiny.build import ensure_base

    return ensure_base(cfg, force=force)


def check_train_start(cfg: Config, run_dir: str | Path, resume: bool) -> None:
    """Raise ResumeError now if training in ``run_dir`` would refuse to start (checkpoints without
    ``resume``, none usable, or a config change that does not fit them): before a model is built,
    a tracking run opened or a file written."""
    from sdpo_core.training.checkpoint import plan_resume
    from sdpo_core.config import dump_yaml

    plan_resume(run_dir, dump_yaml(cfg), resume)


def train_stage(cfg: Config, run_dir: str | Path, resume: bool = False, tracker: Tracker | None = None) -> Path:
    from sdpo_core.training.trainer import Trainer

    with run_lock(run_dir):
        check_train_start(cfg, run_dir, resume)
        split = load_or_prepare(cfg, run_dir)
        return Trainer(cfg, run_dir, tracker=tracker, train_prompts=split.train).run(resume=resume)


def evaluate_stage(
    cfg: Config, run_dir: str | Path, model_dir: str | Path | None, tracker: Tracker | None = None
) -> dict:
    """Evaluate base (and trained, when ``model_dir``) on the held-out prompts."""
    from sdpo_core.evaluation.evaluate import evaluate

    with run_lock(run_dir):
        split = load_or_prepare(cfg, run_dir)
        return evaluate(
            cfg, cfg.model.pretrained, str(model_dir) if model_dir else None, split.eval, eval_dir(run_dir),
            tracker=tracker,
        )


@dataclass
class RunResult:
    final: Path
    eval_json: Path
    eval: dict
    seconds: float
    summary: str


def run_pipeline(cfg: Config, run_dir: str | Path, resume: bool = False) -> RunResult:
    """prepare -> base -> train -> evaluate, with one tracker run per stage, holding the run dir's
    lock throughout."""
    with run_lock(run_dir):
        check_train_start(cfg, run_dir, resume)
        return _run_pipeline(cfg, Path(run_dir), resume)


def _run_pipeline(cfg: Config, run_dir: Path, resume: bool) -> RunResult:
    from sdpo_core.evaluation.evaluate import format_table
    from sdpo_core.tracking.trackers import make_tracker, preflight

    start = time.perf_counter()
    preflight(cfg.tracking.backend)  # an unreachable tracking server stops the run before any work
    split = prepare_stage(cfg, run_dir)
    log.info("prompts: %d train / %d eval", len(split.train), len(split.eval))
    base_stage(cfg)
    tracker = make_tracker(cfg.tracking.backend, cfg.tracking.experiment, run_name=f"{cfg.pipeline}-train")
    final = tracked(lambda: train_stage(cfg, run_dir, resume=resume, tracker=tracker), tracker)
    tracker = make_tracker(cfg.tracking.backend, cfg.tracking.experiment, run_name=f"{cfg.pipeline}-evaluate")
    result = tracked(lambda: evaluate_stage(cfg, run_dir, final, tracker=tracker), tracker)
    seconds = time.perf_counter() - start
    out = eval_dir(run_dir)
    summary = (
        f"{format_table(result)}\n\nrun time: {seconds / 60:.1f} min\n"
        f"trained weights: {final}\neval: {out / 'eval.json'}\nplot: {out / 'reward_vs_steps.png'}\n"
        f"grid: {out / 'grid.png'}"
    )
    return RunResult(final, out / "eval.json", result, seconds, summary)


def tracked(fn, tracker: Tracker | NullTracker):
    """``fn()`` inside ``tracker``'s run, which then ends FINISHED, or FAILED if ``fn`` raised."""
    status = "FAILED"
    try:
        value = fn()
        status = "FINISHED"
        return value
    finally:
        tracker.end(status)


# ---------------------------------------------------------------------------------------------
# Orchestration helpers (flows/ and dvc.yaml): the same outputs, in the shapes those tools read.

TRAIN_OUTPUTS = ("final", "checkpoints", "train_metrics.jsonl", "train_metrics.csv")


def clear_train_outputs(run_dir: str | Path) -> None:
    """Remove a previous training's outputs, as DVC does before it reruns the train stage: a new
    run in the same stable run dir starts from scratch instead of refusing (or resuming) old
    checkpoints."""
    import shutil

    for name in TRAIN_OUTPUTS:
        path = Path(run_dir) / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def export_train_metrics(run_dir: str | Path) -> Path:
    """RUN_DIR/train_metrics.jsonl -> RUN_DIR/train_metrics.csv (one row per epoch): DVC plots read
    CSV/JSON/YAML but not JSON lines."""
    import csv
    import json

    src = Path(run_dir) / "train_metrics.jsonl"
    rows = [json.loads(line) for line in src.read_text(encoding="utf-8").splitlines() if line.strip()]
    columns = ["epoch", *sorted({k for row in rows for k in row} - {"epoch"})]
    out = src.with_suffix(".csv")
    with open(out, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return out
