"""Validate before loading (issue 21, item 7): through the real CLI, every error of the user's input
(a reward whose weights are missing, the prompt file, the LoRA to fuse, the base model itself) is
reported before the diffusion model loads: before the trainer's "loading model" log line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LOADING = "loading model"


def train(tmp_path: Path, base: Path, *sets: str) -> subprocess.CompletedProcess:
    args = ["train", "--pipeline", "tiny-random", "--run-dir", str(tmp_path / "run"),
            "--set", f"model.pretrained={base}", "--set", "tracking.backend=none"]
    for s in sets:
        args += ["--set", s]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "sdpo_core.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("sets,message", [
    (["reward.name=aesthetic"], "reward 'aesthetic'"),  # sd-turbo-aesthetic without reward.options.path
    (["reward.name=aesthetic", "reward.options.path=/no/such/aesthetic"], "/no/such/aesthetic"),
    (["prompts.source=/no/such/prompts.txt"], "/no/such/prompts.txt"),
    (["model.base_lora=./no/such/lora"], "model.base_lora './no/such/lora'"),
    (["model.family_options.vae=/no/such/vae"], "model.family_options.vae '/no/such/vae'"),
], ids=["reward-no-path", "reward-missing-path", "prompt-file", "base-lora", "vae"])
def test_bad_input_fails_before_the_model_loads(tiny_base, tmp_path, sets, message):
    # catches: the reward or a local file checked only after the diffusion model loaded
    out = train(tmp_path, tiny_base, *sets)
    assert out.returncode == 2, out.stderr[-3000:]
    assert message in out.stderr and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert LOADING not in out.stderr


def test_a_missing_base_model_fails_before_the_reward_loads(tiny_base, tmp_path):
    # the base is found (model_index.json) before the reward is built: a reward error never hides it
    out = train(tmp_path, tiny_base, "model.pretrained=/no/such/base", "model.build=null", "reward.name=aesthetic")
    assert out.returncode == 2 and "/no/such/base" in out.stderr and "reward 'aesthetic'" not in out.stderr, \
        out.stderr[-3000:]


def test_the_loading_line_marks_the_model_load(tiny_base, tmp_path):
    # the control: an existing directory that holds no LoRA passes the checks and fails in the
    # fuse, after the model loaded: the log line is there
    not_a_lora = tmp_path / "empty"
    not_a_lora.mkdir()
    out = train(tmp_path, tiny_base, f"model.base_lora={not_a_lora}")
    assert out.returncode == 2, out.stderr[-3000:]
    assert LOADING in out.stderr and "model.base_lora" in out.stderr, out.stderr[-3000:]
