"""`sdpo run --pipeline digits-flow-tiny` end to end, on a build cut short (the real one takes ~9 min)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_digits_flow_tiny_runs_end_to_end(tmp_path):
    base = tmp_path / "base"
    cmd = [sys.executable, "-m", "sdpo_core.cli", "run", "--pipeline", "digits-flow-tiny", "--run-dir",
           str(tmp_path / "run"), "--set", f"model.pretrained={base}", "--set", "model.build_steps=30",
           "--set", "model.build_vae_steps=20", "--set", "train.epochs=2", "--set", "evaluate.num_prompts=4",
           "--set", "evaluate.steps=[1,2]", "--set", "tracking.backend=none"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads((base / "build_info.json").read_text())
    assert info["model"] == "digits-flow-tiny" and info["transformer_steps"] == 30
    assert json.loads((base / "model_index.json").read_text())["_class_name"] == "StableDiffusion3Pipeline"
    result = json.loads((tmp_path / "run" / "eval" / "eval.json").read_text())
    assert set(result["steps"]) == {"1", "2"}
    assert {"digit_accuracy", "diversity"} <= set(result["steps"]["1"]["trained"]["metrics"])
    meta = json.loads((tmp_path / "run" / "final" / "sdpo_model.json").read_text())
    assert meta["family"] == "sd3"
    assert "steps | base" in proc.stdout  # the table
