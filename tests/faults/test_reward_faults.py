"""A remote reward server (`sdpo reward-server`, a real subprocess on 127.0.0.1) that dies in the
middle of an epoch: the client retries (bounded), the epoch fails naming the URL, nothing of that
epoch is trained, and `--resume` continues from the last checkpoint once the server is back."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from orchestration_testing import OFFLINE_ENV, ROOT, free_port, start, stop, wait_http

pytestmark = pytest.mark.services
HERE = Path(__file__).resolve().parent


def _serve(port: int, log: Path, die_at: int):
    env = {**os.environ, **OFFLINE_ENV, "PYTHONPATH": f"{ROOT}{os.pathsep}{HERE}",
           "SDPO_TEST_DIE_AT": str(die_at)}
    args = [sys.executable, "-m", "sdpo_core.cli", "reward-server", "--reward",
            "reward_fault_fns:dying_brightness", "--port", str(port), "--device", "cpu"]
    proc = start(args, log, env)
    wait_http(f"http://127.0.0.1:{port}/health", 60, proc)
    return proc


def test_reward_server_killed_mid_epoch_fails_the_epoch_untrained_and_resume_continues(tiny_cfg, tmp_path):
    """Fault: the reward server SIGKILLs itself while scoring the second batch of epoch 1 (call 4;
    two batches per epoch). Must hold: after 1 + 2 retries the run fails with a RewardError naming
    the URL; the weights in memory equal the last checkpoint's (epoch 0: nothing of epoch 1 was
    trained on); no checkpoint or metrics line of epoch 1 exist; with the server back, a resumed
    run starts at epoch 1 and finishes all three epochs."""
    import json

    from sdpo_core.rewards import RewardError
    from sdpo_core.training.checkpoint import latest_checkpoint, load_checkpoint
    from sdpo_core.training.trainer import Trainer

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cfg = tiny_cfg("train.epochs=3", "sample.num_batches_per_epoch=2", "reward.name=remote",
                   f"reward.options.url={url}", "reward.options.retries=2", "reward.options.backoff=0.1",
                   "reward.options.timeout=10")
    run_dir = tmp_path / "run"
    proc = _serve(port, tmp_path / "server1.log", die_at=4)
    try:
        trainer = Trainer(cfg, run_dir)
        with pytest.raises(RewardError) as exc:
            trainer.run()
    finally:
        stop(proc)
    assert proc.returncode == -9  # it really died (SIGKILL), it was not stopped by us
    assert url in str(exc.value) and "after 3 attempt(s)" in str(exc.value)

    latest = latest_checkpoint(run_dir)
    assert latest is not None and latest.name == "epoch_0000"
    saved = load_checkpoint(latest).weights
    live = trainer.trainable_state()
    assert saved.keys() == live.keys()
    assert all(torch.equal(saved[k], live[k]) for k in saved)
    assert len((run_dir / "train_metrics.jsonl").read_text().splitlines()) == 1
    assert not (run_dir / "final").exists()

    proc = _serve(port, tmp_path / "server2.log", die_at=0)
    try:
        final = Trainer(cfg, run_dir).run(resume=True)
    finally:
        stop(proc)
    epochs = [json.loads(line)["epoch"] for line in (run_dir / "train_metrics.jsonl").read_text().splitlines()]
    assert epochs == [0, 1, 2] and (final / "sdpo_model.json").is_file()
