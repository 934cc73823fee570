"""Run the `sdpo` command as a real process, the way a user (or Prefect) starts it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}


def sdpo_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "sdpo_core.cli", *args]


def sdpo(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(sdpo_cmd(*args), cwd=ROOT, env=env(), capture_output=True, text=True,
                          timeout=600, **kwargs)


def start(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(sdpo_cmd(*args), cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


def tiny_args(tiny_base: Path, run_dir: Path, *overrides: str) -> list[str]:
    """`sdpo train` arguments for the tiny random pipeline, without tracking."""
    sets = [f"model.pretrained={tiny_base}", "tracking.backend=none", *overrides]
    return ["--pipeline", "tiny-random", "--run-dir", str(run_dir), *[a for s in sets for a in ("--set", s)]]


def lora_weights(final: Path):
    from safetensors.torch import load_file

    return load_file(str(final / "pytorch_lora_weights.safetensors"))
