"""Fault: a NaN or infinite loss or gradient in training (injected for real: a reward whose returns
overflow, a poisoned stat-tracker state, a gradient hook, weights set to NaN by a callback).

skip mode: the bad update leaves weights and optimizer state as they were and training goes on;
stop mode (the default): after train.max_nonfinite_steps bad updates in a row the run stops (the
CLI: exit 1, one line naming epoch, update and the last good checkpoint), that checkpoint is
intact and resumable, and no checkpoint is ever written from non-finite weights or prunes a good one.
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import torch
from fault_helpers import ROOT, env, lora_weights, sdpo_cmd, tiny_args

from sdpo_core.training.callbacks import TrainerCallback
from sdpo_core.training.checkpoint import (
    CheckpointWriteError,
    checkpoint_dirs,
    load_checkpoint,
    verify_checkpoint,
)
from sdpo_core.training.nonfinite import NonFiniteError
from sdpo_core.training.trainer import Trainer

HERE = Path(__file__).resolve().parent
UPDATES_PER_EPOCH = 4  # tiny-random: 4 SDPO pairs / train batch 2 x 2 steps, one optimizer step each


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "train_metrics.jsonl").read_text().splitlines() if x]


def finite(weights: dict[str, torch.Tensor]) -> bool:
    return all(torch.isfinite(v).all() for v in weights.values())


def same_state(a: dict, b: dict) -> bool:
    """Equal nested dicts of tensors / numbers (weights or an optimizer state_dict)."""
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same_state(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same_state(x, y) for x, y in zip(a, b, strict=True))
    return a == b


class PoisonGradient(TrainerCallback):
    """Registers a tensor hook (torch's public ``register_hook``) on one LoRA weight that turns its
    gradient into NaN in backward pass ``bad`` (0-based), and snapshots the weights and the optimizer
    state as each backward starts (= before that update)."""

    def __init__(self, bad: int) -> None:
        self.bad, self.calls, self.before = bad, 0, []

    def on_run_start(self, trainer, start_epoch):
        def hook(grad):
            self.before.append((trainer.trainable_state(), copy.deepcopy(trainer.optimizer.state_dict())))
            self.calls += 1
            return grad * float("nan") if self.calls - 1 == self.bad else grad

        trainer.trainable[0].register_hook(hook)


def test_nan_gradient_is_skipped_and_training_goes_on(tiny_cfg, tmp_path):
    """skip mode, a NaN gradient in update 2 of epoch 0: that update changes neither the weights nor
    AdamW's state, the next one trains, the epoch counts 1 skipped update, the run finishes finite
    (bugs caught: a NaN step applied, a skip that still moves AdamW's moments, a run that stops)."""
    poison = PoisonGradient(bad=1)
    tr = Trainer(tiny_cfg("train.nonfinite=skip", "train.epochs=2"), tmp_path, callbacks=[poison])
    final = tr.run()
    assert poison.calls == 2 * UPDATES_PER_EPOCH
    before_bad, after_bad, after_next = poison.before[1], poison.before[2], poison.before[3]
    assert same_state(before_bad[0], after_bad[0]) and same_state(before_bad[1], after_bad[1])
    assert not same_state(after_bad[0], after_next[0])  # training went on
    assert tr.global_step == 2 * UPDATES_PER_EPOCH - 1
    lines = metrics(tmp_path)
    assert [m["nonfinite/skipped"] for m in lines] == [1, 0]
    assert all(torch.isfinite(torch.tensor([m["loss"], m["grad_norm"]])).all() for m in lines)
    assert finite(lora_weights(final))


class PoisonTracker(TrainerCallback):
    """At the start of epoch ``at``, every training prompt's stat-tracker history becomes ``value``
    (loaded with the tracker's public load_state_dict)."""

    def __init__(self, at: int, value: float) -> None:
        self.at, self.value = at, value

    def on_epoch_start(self, trainer, epoch):
        if epoch != self.at:
            return
        st = trainer.stat_tracker
        prompts = trainer.train_prompts
        k, t = st.buffer_size, st.num_steps
        st.load_state_dict({"prompts": prompts, "buffer": torch.full((len(prompts), t, k), self.value, dtype=torch.float64),
                            "count": torch.full((len(prompts),), k), "cursor": torch.zeros(len(prompts)),
                            "buffer_size": k, "min_count": st.min_count, "num_steps": t})


def test_nan_advantages_skip_the_epoch_in_skip_mode(tiny_cfg, tmp_path):
    """A history of +inf returns (an infinite return kept by the tracker): advantages (r - inf) / nan
    are NaN (an advantage that is merely infinite is clipped by train.adv_clip_max), so is every loss of epoch 1:
    skip mode skips all its updates, the run ends with epoch 0's weights (bug caught: NaN
    weights checkpointed or saved as the final model)."""
    tr = Trainer(tiny_cfg("train.nonfinite=skip", "train.epochs=2", "train.keep_checkpoints=2"), tmp_path,
                 callbacks=[PoisonTracker(at=1, value=float("inf"))])
    final = tr.run()
    second = metrics(tmp_path)[1]
    assert second["nonfinite/skipped"] == UPDATES_PER_EPOCH and "loss" not in second
    first, last = (load_checkpoint(d).weights for d in checkpoint_dirs(tmp_path))
    assert same_state(first, last) and same_state(first, tr.trainable_state()) and finite(lora_weights(final))


def test_nan_advantages_stop_the_run_naming_the_last_good_checkpoint(tiny_cfg, tmp_path):
    """Default stop mode, train.max_nonfinite_steps=3: NonFiniteError at epoch 1, update 3, naming
    checkpoint epoch_0000, which is intact and holds the weights the run stopped with."""
    tr = Trainer(tiny_cfg("train.epochs=3"), tmp_path, callbacks=[PoisonTracker(at=1, value=float("inf"))])
    with pytest.raises(NonFiniteError) as info:
        tr.run()
    good = tmp_path / "checkpoints" / "epoch_0000"
    assert str(info.value).startswith("training stopped at epoch 1, update 3 of the epoch (after optimizer step 4)")
    assert f"the last good checkpoint is {good}" in str(info.value) and "\n" not in str(info.value)
    assert checkpoint_dirs(tmp_path) == [good] and verify_checkpoint(good) is None
    assert same_state(load_checkpoint(good).weights, tr.trainable_state())
    assert not (tmp_path / "final").exists()


class PoisonWeights(TrainerCallback):
    """Sets one trained weight to NaN at the end of epoch ``at`` (before its checkpoint)."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_epoch_end(self, trainer, epoch, metrics):
        if epoch == self.at:
            with torch.no_grad():
                trainer.trainable[0].view(-1)[0] = float("nan")


@pytest.mark.parametrize("background", [True, False], ids=["async", "inline"])
def test_nan_weights_are_never_checkpointed_nor_prune_good_ones(tiny_cfg, tmp_path, background):
    """keep_checkpoints=2 and NaN weights at the end of epoch 2: checkpoint epoch_0002 is refused
    before anything is written, both good checkpoints stay and verify, no final model (bug caught:
    the NaN checkpoint written and the two good ones pruned: the run lost)."""
    tr = Trainer(tiny_cfg("train.epochs=3", "train.keep_checkpoints=2", f"train.async_checkpoint={background}"),
                 tmp_path, callbacks=[PoisonWeights(at=2)])
    with pytest.raises(CheckpointWriteError, match=r"epoch_0002 was not written: 1 weight tensor\(s\) hold NaN"):
        tr.run()
    dirs = checkpoint_dirs(tmp_path)
    assert [d.name for d in dirs] == ["epoch_0000", "epoch_0001"]
    assert all(verify_checkpoint(d) is None and finite(load_checkpoint(d).weights) for d in dirs)
    assert not list((tmp_path / "checkpoints").glob("*.tmp")) and not (tmp_path / "final").exists()


def _train(*args: str) -> subprocess.CompletedProcess:
    run_env = {**env(), "PYTHONPATH": f"{ROOT}{os.pathsep}{HERE}"}
    return subprocess.run(sdpo_cmd("train", *args), cwd=ROOT, env=run_env, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.slow
def test_cli_stops_with_one_line_and_resumes_from_the_last_good_checkpoint(tiny_base, tmp_path):
    """`sdpo train` whose reward overflows the returns from epoch 2 on (the first step's returns: the
    updates at the other step alternate with them, so stop at the first: max_nonfinite_steps=1):
    exit 1, one line naming epoch 2 and checkpoint epoch_0001, no traceback; with keep_checkpoints=2
    both good checkpoints stay (no NaN one exists); `--resume` with a sound reward finishes the run."""
    run = tmp_path / "run"
    args = tiny_args(tiny_base, run, "train.epochs=4", "train.keep_checkpoints=2", "train.max_nonfinite_steps=1",
                     "reward.name=reward_fault_fns:overflow_from_third_call")
    out = _train(*args)
    assert out.returncode == 1, out.stderr[-3000:]
    errors = [x for x in out.stderr.splitlines() if x.startswith("error:")]
    good = run / "checkpoints" / "epoch_0001"
    assert len(errors) == 1 and errors[0] == out.stderr.rstrip().splitlines()[-1], out.stderr[-3000:]
    assert re.match(r"error: training stopped at epoch 2, update \d of the epoch \(after optimizer step \d+\)",
                    errors[0]), errors[0]
    assert f"the last good checkpoint is {good}" in errors[0] and "Traceback" not in out.stderr
    dirs = checkpoint_dirs(run)
    assert [d.name for d in dirs] == ["epoch_0000", "epoch_0001"]
    assert all(verify_checkpoint(d) is None and finite(load_checkpoint(d).weights) for d in dirs)
    assert not (run / "final").exists()

    resumed = _train(*args, "--set", "reward.name=reward_fault_fns:dying_brightness", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [m["epoch"] for m in metrics(run)] == [0, 1, 2, 3]
    assert finite(lora_weights(run / "final"))
