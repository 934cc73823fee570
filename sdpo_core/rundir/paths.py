"""Where a run's files live: the default run directory and the fixed folders inside it.

Every stage reads and writes fixed paths under the run directory (``stages.py`` declares which);
the CLI, the Prefect flow and dvc.yaml all use ``runs/<pipeline>`` unless told otherwise.
"""

from __future__ import annotations

from pathlib import Path

RUNS_ROOT = Path("runs")


def default_run_dir(pipeline: str) -> Path:
    """``runs/<pipeline>`` (relative to the working directory): where a run goes unless told."""
    return RUNS_ROOT / pipeline


def prompts_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "prompts"


def eval_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "eval"
