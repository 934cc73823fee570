"""`dvc params diff` (real DVC, in a throwaway git checkout) shows what a run changed with `--set`:
evaluate records the run's resolved config (runs/<pipeline>/config.yaml) as a params file."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from orchestration_testing import GIT_IDENTITY, OFFLINE_ENV, git, make_project

pytestmark = pytest.mark.slow
PIPELINE = "tiny-random"


def _run(project, *argv: str) -> str:
    env = {**os.environ, **OFFLINE_ENV, **GIT_IDENTITY, "PYTHONPATH": str(project),
           "DVC_SITE_CACHE_DIR": str(project / ".dvc" / "tmp" / "site-cache")}
    out = subprocess.run([sys.executable, "-m", *argv], cwd=project, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, (argv, out.stdout[-2000:], out.stderr[-3000:])
    return out.stdout


def test_params_diff_shows_a_set_override(tmp_path):
    project = make_project(tmp_path / "project")
    sets = ["--set", "tracking.backend=none"]
    _run(project, "sdpo_core.cli", "run", "--pipeline", PIPELINE, *sets)
    _run(project, "sdpo_core.cli", "export-metrics", "--pipeline", PIPELINE, *sets)
    _run(project, "dvc", "commit", "--force", *(f"{s}@{PIPELINE}" for s in ("prepare", "base", "train", "evaluate")))
    lock = (project / "dvc.lock").read_text()
    assert f"runs/{PIPELINE}/config.yaml:" in lock and "learning_rate: 0.0001" in lock
    git(project, "add", "dvc.lock")
    git(project, "commit", "-q", "-m", "first run")

    _run(project, "sdpo_core.cli", "train", "--pipeline", PIPELINE, "--run-dir", str(project / "runs" / PIPELINE),
         *sets, "--set", "train.learning_rate=0.0002", "--set", "train.epochs=3", "--resume")
    diff = _run(project, "dvc", "params", "diff", "--md")
    rows = [r for r in diff.splitlines() if "train.learning_rate" in r]
    assert len(rows) == 1 and f"runs/{PIPELINE}/config.yaml" in rows[0], diff
    assert "0.0001" in rows[0] and "0.0002" in rows[0], diff
