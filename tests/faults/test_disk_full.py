"""Fault: the disk fills up (or a file-size limit is hit) while a checkpoint is written."""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import sys

import pytest
from fault_helpers import ROOT, env, sdpo, tiny_args

WRITE_TWO = """
import sys, torch
from sdpo_core.training.checkpoint import CheckpointState, CheckpointWriteError, save_checkpoint

def state(epoch, n):
    return CheckpointState(epoch=epoch, global_step=epoch, weights={"w": torch.zeros(n)},
                           optimizer={"state": {}, "param_groups": []}, tracker=None,
                           rng={"torch": torch.get_rng_state()}, config_yaml="seed: 1\\n")

save_checkpoint(sys.argv[1], state(0, 1000), keep=2)      # 4 KB of weights: under the limit
try:
    save_checkpoint(sys.argv[1], state(1, 250_000), keep=2)  # 1 MB: over it
except CheckpointWriteError as exc:
    print(exc)
    sys.exit(3)
"""


def _limit_file_size(limit: int):
    def preexec() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # then write() fails with EFBIG instead of killing us
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return preexec


def test_file_size_limit_fails_the_checkpoint_cleanly(tmp_path):
    """A checkpoint write hits RLIMIT_FSIZE (EFBIG, a real failed write()): CheckpointWriteError says how
    much space was needed and that the previous checkpoint is intact; no .tmp is left; the previous
    checkpoint still verifies and loads."""
    from sdpo_core.training.checkpoint import (
        checkpoint_dirs,
        latest_checkpoint,
        load_checkpoint,
        verify_checkpoint,
    )

    out = subprocess.run([sys.executable, "-c", WRITE_TWO, str(tmp_path)], cwd=ROOT, env=env(),
                         capture_output=True, text=True, timeout=120, preexec_fn=_limit_file_size(200_000))
    assert out.returncode == 3, out.stderr[-2000:]
    assert "File too large" in out.stdout and "It needs about 1.1 MB" in out.stdout
    assert "previous checkpoint epoch_0000 is intact" in out.stdout
    assert [d.name for d in checkpoint_dirs(tmp_path)] == ["epoch_0000"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["epoch_0000"]  # no epoch_0001.tmp
    assert verify_checkpoint(tmp_path / "checkpoints" / "epoch_0000") is None
    assert load_checkpoint(latest_checkpoint(tmp_path)).weights["w"].shape == (1000,)


@pytest.fixture
def small_fs(tmp_path):
    """A 400 KB tmpfs: room for one tiny-random checkpoint (~270 KB), not two. Needs root."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(mnt)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=True)


@pytest.mark.slow
def test_sdpo_train_on_a_full_disk_keeps_the_last_checkpoint(tiny_base, small_fs):
    """`sdpo train` on a filesystem that fills up at the second checkpoint (ENOSPC): exit 1 with one
    message (space needed and free, what to do), no traceback, no .tmp left; epoch_0000 verifies, so
    --resume can continue once there is space."""
    from sdpo_core.training.checkpoint import checkpoint_dirs, verify_checkpoint

    run_dir = small_fs / "run"
    out = sdpo("train", *tiny_args(tiny_base, run_dir, "train.epochs=3", "train.keep_checkpoints=2"))
    assert out.returncode == 1, out.stderr[-3000:]
    assert "No space left on device" in out.stderr and "It needs about" in out.stderr
    assert "epoch_0000 is intact" in out.stderr and "--resume" in out.stderr
    assert "Traceback" not in out.stderr
    assert [d.name for d in checkpoint_dirs(run_dir)] == ["epoch_0000"]
    assert not list((run_dir / "checkpoints").glob("*.tmp"))
    assert verify_checkpoint(run_dir / "checkpoints" / "epoch_0000") is None
