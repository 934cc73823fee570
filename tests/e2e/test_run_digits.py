"""`sdpo run` on the embedded default through the real CLI, on a reduced budget."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_sdpo_run_digits_tiny_reduced_budget(tmp_path):
    from sdpo_core.tiny.train_base import build_digits_base

    base, run_dir = tmp_path / "base", tmp_path / "run"
    # a small real build (its own tests cover the builder); `sdpo run` must reuse it, not rebuild
    build_digits_base(base, steps=60, vae_steps=20, eval_per_digit=1, progress=False)
    mtime = (base / "model_index.json").stat().st_mtime
    sets = [f"model.pretrained={base}", "train.epochs=2", "evaluate.steps=[1, 2]", "evaluate.num_prompts=10", "tracking.backend=none"]
    cmd = [sys.executable, "-m", "sdpo_core.cli", "run", "--pipeline", "digits-tiny", "--run-dir", str(run_dir)]
    for s in sets:
        cmd += ["--set", s]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the table and the paths are printed at the end
    assert "steps | base mean" in proc.stdout and "grid:" in proc.stdout
    assert (base / "model_index.json").stat().st_mtime == mtime
    manifest = json.loads((run_dir / "prompts" / "manifest.json").read_text())
    result = json.loads((run_dir / "eval" / "eval.json").read_text())
    assert result["reward"] == "digit_alignment_bold" and set(result["steps"]) == {"1", "2"}
    assert result["num_prompts"] == 10
    for entry in result["steps"].values():
        for model in ("base", "trained"):
            assert entry[model]["n"] == 20 and 0.0 <= entry[model]["mean"] <= 1.0
            assert {"digit_accuracy", "diversity", "boldness"} <= set(entry[model]["metrics"])
    # eval prompts are held out from training
    train = set((run_dir / "prompts" / "train.txt").read_text().splitlines())
    assert not train & set(result["prompts"]) and manifest["counts"]["eval"] > 0
    assert len((run_dir / "train_metrics.jsonl").read_text().splitlines()) == 2
    assert Image.open(run_dir / "eval" / "grid.png").format == "PNG"
    # a second run refuses to overwrite the finished training
    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 2 and "--resume" in again.stderr
    assert (base / "model_index.json").stat().st_mtime == mtime
