"""Fault: SIGTERM (what Prefect sends on cancel) or SIGINT (Ctrl-C) while `sdpo train` runs."""

from __future__ import annotations

import signal
import time

import pytest
import torch
from fault_helpers import lora_weights, sdpo, start, tiny_args

EPOCHS = 8


@pytest.mark.slow
@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143)], ids=["sigterm"])
def test_stopped_run_resumes_to_the_uninterrupted_weights(tiny_base, tmp_path, sig, code):
    """SIGTERM after the first checkpoint: exit 143 with a message naming the last complete checkpoint
    and the --resume command, no traceback; that checkpoint verifies; `--resume` then ends with weights
    bit-identical to an uninterrupted run's (bugs caught: a signal that kills without cleanup, a
    half-written checkpoint picked up, a resume that replays or skips work)."""
    from sdpo_core.training.checkpoint import latest_checkpoint, verify_checkpoint

    stopped = tmp_path / "stopped"
    args = tiny_args(tiny_base, stopped, f"train.epochs={EPOCHS}")
    proc = start("train", *args)
    first = stopped / "checkpoints" / "epoch_0000" / "manifest.json"
    deadline = time.time() + 180
    while not first.is_file():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.02)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err[-3000:]
    latest = latest_checkpoint(stopped)
    assert latest is not None and verify_checkpoint(latest) is None
    assert int(latest.name.split("_")[1]) < EPOCHS - 1, "the run finished before the signal: nothing tested"
    assert f"the last complete checkpoint is {latest}" in err and "--resume" in err.splitlines()[-1]
    assert "Traceback" not in err
    assert not (stopped / "final").exists() and not (stopped / ".lock").exists()

    resumed = sdpo("train", *args, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    straight = tmp_path / "straight"
    out = sdpo("train", *tiny_args(tiny_base, straight, f"train.epochs={EPOCHS}"))
    assert out.returncode == 0, out.stderr[-3000:]
    a, b = lora_weights(straight / "final"), lora_weights(stopped / "final")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "resumed run differs"
    epochs = [line for line in (stopped / "train_metrics.jsonl").read_text().splitlines() if line]
    assert len(epochs) == EPOCHS  # the stopped epoch's metrics are not counted twice
