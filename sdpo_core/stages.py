"""The stages of a run, declared once (:data:`STAGES`): the CLI, ``run_pipeline``, the Prefect flow,
the DVC versioning and its dvc.yaml check all read this list.

Each stage reads and writes fixed paths under the run directory (``runs/<pipeline>`` by default,
``rundir/paths.py``), which are also the ``outs`` of the DVC stages. Every stage that writes there
holds the run directory's lock (``rundir/lock.py``): a second run on the same directory fails at once.
Under ``torchrun`` / ``accelerate launch`` every rank runs the same stage functions; rank 0 alone
writes, builds, downloads and talks to MLflow, the others read what it wrote (``rundir/ranks.py``).

A new stage is one :class:`Stage` in :data:`STAGES` plus its command (see docs/architecture.md):
``sdpo <name>`` appears, ``run_pipeline`` and the flow run it in order, and
tests/unit/test_structure.py fails until dvc.yaml has a stage with its name and outputs.

Heavy modules (torch, diffusers) are imported inside the stage functions so that ``sdpo --help``,
``sdpo config`` and ``sdpo rewards``, which read the declarations, load no model library.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdpo_core.config import Config, dump_yaml
from sdpo_core.prompts import PromptSplit, load_split, prepare
from sdpo_core.rundir import ranks
from sdpo_core.rundir.lock import run_lock
from sdpo_core.rundir.paths import eval_dir, prompts_dir
from sdpo_core.tracking.register import champion_weights, register_stage
from sdpo_core.tracking.runs import stage_tracker, tracked
from sdpo_core.tracking.trackers import Tracker, preflight

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------ the stage functions
def prepare_stage(cfg: Config, run_dir: str | Path) -> PromptSplit:
    """Write the cleaned train/eval prompt split (rank 0 under a launcher); returns the PromptSplit."""
    with run_lock(run_dir):
        return ranks.main_only(prepare, cfg.prompts, prompts_dir(run_dir))


def _prepare_if_missing(cfg: Config, run_dir: str | Path) -> None:
    if not (prompts_dir(run_dir) / "manifest.json").is_file():
        prepare(cfg.prompts, prompts_dir(run_dir))


def load_or_prepare(cfg: Config, run_dir: str | Path) -> PromptSplit:
    """The run's prompt split, written first (by rank 0) when the run dir has none."""
    with run_lock(run_dir):
        ranks.main_only(_prepare_if_missing, cfg, run_dir)
        return load_split(prompts_dir(run_dir))


def base_stage(cfg: Config, force: bool = False) -> str:
    """The model to train from (``model.pretrained``), built first when ``model.build`` says so (under
    a launcher by rank 0, the others then load it: ``tiny.build.ensure_base_once``)."""
    from sdpo_core.tiny.build import ensure_base_once  # diffusers

    return ensure_base_once(cfg, force=force)


def check_train_start(cfg: Config, run_dir: str | Path, resume: bool) -> None:
    """Raise ResumeError now if training in ``run_dir`` would refuse to start (checkpoints without
    ``resume``, none usable, or a config change that does not fit them): before a model is built,
    a tracking run opened or a file written."""
    from sdpo_core.training.checkpoint import plan_resume  # torch

    ranks.main_only(plan_resume, run_dir, dump_yaml(cfg), resume)  # one verdict, one message


def train_stage(cfg: Config, run_dir: str | Path, resume: bool = False, tracker: Tracker | None = None) -> Path:
    from sdpo_core.training.trainer import Trainer  # torch, diffusers

    with run_lock(run_dir):
        check_train_start(cfg, run_dir, resume)
        split = load_or_prepare(cfg, run_dir)
        return Trainer(cfg, run_dir, tracker=tracker, train_prompts=split.train).run(resume=resume)


def evaluate_stage(
    cfg: Config, run_dir: str | Path, model_dir: str | Path | None, tracker: Tracker | None = None
) -> dict:
    """Evaluate base (and trained, when ``model_dir``) on the held-out prompts; with a trained model,
    the registry's champion too (when tracking to MLflow and there is one), on the same samples."""
    from sdpo_core.evaluation.evaluate import Champion, evaluate  # torch, diffusers

    with run_lock(run_dir), _champion(cfg, run_dir) if model_dir else nullcontext() as found:
        split = load_or_prepare(cfg, run_dir)
        champion = Champion(*found) if found else None
        return evaluate(
            cfg, cfg.model.pretrained, str(model_dir) if model_dir else None, split.eval, eval_dir(run_dir),
            tracker=tracker, champion=champion,
        )


def _champion(cfg: Config, run_dir: str | Path) -> AbstractContextManager[tuple[str, str, Path] | None]:
    """``champion_weights``, downloaded by rank 0 alone (the only process that talks to MLflow);
    under a launcher into the run dir, where every rank reads it."""
    return ranks.from_main_process(lambda: champion_weights(cfg, run_dir if ranks.launched() else None))


def trained_model(run_dir: Path) -> str | None:
    """RUN_DIR/final when training wrote it: what ``sdpo evaluate`` evaluates unless ``--model``."""
    return str(run_dir / "final") if (run_dir / "final").exists() else None


# ------------------------------------------------------------------- the stages' `sdpo` commands
def prepare_command(cfg: Config, run_dir: Path, args: argparse.Namespace) -> None:
    split = prepare_stage(cfg, run_dir)
    print(f"{len(split.train)} train / {len(split.eval)} eval prompts -> {prompts_dir(run_dir)}")


def base_command(cfg: Config, run_dir: Path, args: argparse.Namespace) -> None:
    print(base_stage(cfg, force=args.force))


def train_command(cfg: Config, run_dir: Path, args: argparse.Namespace) -> None:
    with run_lock(run_dir):  # one writer per run dir; refusals come before a model or a tracking run
        check_train_start(cfg, run_dir, args.resume)
        print(dump_yaml(cfg), end="", flush=True)
        # an unreachable tracking server stops here, before any model; under a launcher rank 0 alone
        # tracks (the other ranks get a NullTracker from make_tracker)
        tracker = stage_tracker(cfg, "train", run_id=args.tracking_run_id)
        base_stage(cfg)
        with tracked(tracker):
            final = train_stage(cfg, run_dir, resume=args.resume, tracker=tracker)
    print(f"trained weights: {final}")


def evaluate_command(cfg: Config, run_dir: Path, args: argparse.Namespace) -> None:
    from sdpo_core.evaluation.evaluate import format_table  # torch

    model = args.model or trained_model(run_dir)
    with tracked(stage_tracker(cfg, "evaluate")) as tracker:
        result = evaluate_stage(cfg, run_dir, model, tracker=tracker)
    print(format_table(result))


def register_command(cfg: Config, run_dir: Path, args: argparse.Namespace) -> None:
    if not ranks.is_main_process():  # under a launcher: one registration, by rank 0
        return
    reg = register_stage(cfg, run_dir, parent_run_id=args.parent_run_id)
    print(f"{reg.name} version {reg.version} -> {reg.alias}: {reg.reason}")


# ------------------------------------------------------------------ the stages within `sdpo run`
@dataclass
class RunState:
    """What ``run_pipeline`` carries from stage to stage: ``results[name]`` is a stage's return."""

    cfg: Config
    run_dir: Path
    resume: bool
    results: dict[str, Any] = field(default_factory=dict)


def prepare_step(run: RunState) -> PromptSplit:
    split = prepare_stage(run.cfg, run.run_dir)
    log.info("prompts: %d train / %d eval", len(split.train), len(split.eval))
    return split


def base_step(run: RunState) -> str:
    return base_stage(run.cfg)


def train_step(run: RunState) -> Path:
    with tracked(stage_tracker(run.cfg, "train")) as tracker:
        return train_stage(run.cfg, run.run_dir, resume=run.resume, tracker=tracker)


def evaluate_step(run: RunState) -> dict:
    with tracked(stage_tracker(run.cfg, "evaluate")) as tracker:
        return evaluate_stage(run.cfg, run.run_dir, run.results["train"], tracker=tracker)


# ---------------------------------------------------------------------------------- declarations
def _always(cfg: Config) -> bool:
    return True


def _builds_base(cfg: Config) -> bool:
    return cfg.model.build is not None


def _tracks_to_mlflow(cfg: Config) -> bool:
    return cfg.tracking.backend == "mlflow"


@dataclass(frozen=True)
class Option:
    """One command-line option of a stage's ``sdpo`` command: ``add_argument(*flags, **kwargs)``."""

    flags: tuple[str, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Stage:
    """One stage of a run.

    ``command(cfg, run_dir, args)`` is ``sdpo <name>`` (it prints what the user sees). ``params``
    are the config sections it reads ("*": all of them), ``inputs`` the paths it reads and
    ``outputs`` those it writes, relative to the run directory; for a ``versioned`` stage they are
    dvc.yaml's ``params``, ``runs/<pipeline>/`` deps, and ``outs`` + ``metrics`` + ``plots``.
    ``applies(cfg)``: whether a full run (``sdpo run``, the flow) includes it for this config, and
    ``skip_note`` what the flow logs when it does not. ``step(run)`` is the stage within ``sdpo run``
    (None: its command with the options' defaults; ``in_run=False``: ``sdpo run`` leaves it out).
    """

    name: str
    description: str
    command: Callable[[Config, Path, argparse.Namespace], None]
    params: tuple[str, ...]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    options: tuple[Option, ...] = ()
    takes_run_dir: bool = True
    versioned: bool = True
    applies: Callable[[Config], bool] = _always
    skip_note: str = ""
    step: Callable[[RunState], Any] | None = None
    in_run: bool = True

    def default_args(self) -> argparse.Namespace:
        """The command's options at their defaults (how ``sdpo run`` and the flow call ``command``)."""
        parser = argparse.ArgumentParser(add_help=False)
        for option in self.options:
            parser.add_argument(*option.flags, **option.kwargs)
        return parser.parse_args([])

    def run_in_pipeline(self, run: RunState) -> Any:
        if self.step is not None:
            return self.step(run)
        return self.command(run.cfg, run.run_dir, self.default_args())


RESUME = Option(("--resume",), {"action": "store_true", "help": "continue from the last complete checkpoint"})
TRACKING_RUN = Option(("--tracking-run-id",), {"help": "log into this existing MLflow run instead of opening one "
                                                     "(the Prefect flow's run of a launched `sdpo train`)"})

STAGES: tuple[Stage, ...] = (
    Stage("prepare", "build, clean and split the prompt set", prepare_command,
          params=("prompts",), inputs=(), outputs=("prompts",), step=prepare_step),
    Stage("base", "build the embedded base model (cached) or check the configured one", base_command,
          params=("model",), inputs=(), outputs=("base",),  # model.pretrained: runs/<pipeline>/base when built
          options=(Option(("--force",), {"action": "store_true", "help": "rebuild even if it exists"}),),
          takes_run_dir=False, applies=_builds_base, step=base_step),
    Stage("train", "SDPO (or DDPO, GRPO, DiffusionNFT) online training", train_command,
          params=("*",), inputs=("prompts", "base"),
          outputs=("final", "checkpoints", "config.yaml", "train_metrics.jsonl", "train_metrics.csv"),
          options=(RESUME, TRACKING_RUN), step=train_step),
    Stage("evaluate", "base vs trained at several step counts: eval.json, plot, grid", evaluate_command,
          params=("sample", "evaluate", "reward"), inputs=("prompts", "base", "final"),
          outputs=("eval/eval.json", "eval/reward_vs_steps.png", "eval/grid.png"),
          options=(Option(("--model",), {"help": "trained model dir (default: RUN_DIR/final if present)"}),),
          step=evaluate_step),
    Stage("register", "register RUN_DIR's model in MLflow; champion only if it beats the current one",
          register_command, params=("register", "tracking"), inputs=("final", "eval/eval.json"), outputs=(),
          options=(Option(("--parent-run-id",), {"help": "MLflow run to nest the registration run under"}),),
          versioned=False, applies=_tracks_to_mlflow, skip_note="tracking.backend is 'none': the model is not registered",
          in_run=False),
)


def stage(name: str) -> Stage:
    return next(s for s in STAGES if s.name == name)


def versioned_stages() -> list[str]:
    """The stages DVC versions, in order: dvc.yaml defines exactly these (tests/unit/test_structure.py)."""
    return [s.name for s in STAGES if s.versioned]


# ----------------------------------------------------------------------------------- `sdpo run`
@dataclass
class RunResult:
    final: Path
    eval_json: Path
    eval: dict
    seconds: float
    summary: str


def run_pipeline(cfg: Config, run_dir: str | Path, resume: bool = False) -> RunResult:
    """The stages of :data:`STAGES` that are ``in_run`` and apply to ``cfg``, in order (prepare ->
    base -> train -> evaluate), with one tracker run per tracked stage, holding the run dir's lock
    throughout."""
    with run_lock(run_dir):
        check_train_start(cfg, run_dir, resume)
        return _run_pipeline(cfg, Path(run_dir), resume)


def _run_pipeline(cfg: Config, run_dir: Path, resume: bool) -> RunResult:
    from sdpo_core.evaluation.evaluate import format_table  # torch

    start = time.perf_counter()
    preflight(cfg.tracking.backend)  # an unreachable tracking server stops the run before any work
    run = RunState(cfg, run_dir, resume)
    for s in STAGES:
        if s.in_run and s.applies(cfg):
            run.results[s.name] = s.run_in_pipeline(run)
    final, result = run.results["train"], run.results["evaluate"]
    seconds = time.perf_counter() - start
    out = eval_dir(run_dir)
    summary = (
        f"{format_table(result)}\n\nrun time: {seconds / 60:.1f} min\n"
        f"trained weights: {final}\neval: {out / 'eval.json'}\nplot: {out / 'reward_vs_steps.png'}\n"
        f"grid: {out / 'grid.png'}"
    )
    return RunResult(final, out / "eval.json", result, seconds, summary)
