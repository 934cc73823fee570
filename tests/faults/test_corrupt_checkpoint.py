"""Fault: the latest checkpoint's files are truncated or damaged, or the config changed, at --resume."""

from __future__ import annotations

import json

import pytest
from fault_helpers import sdpo, tiny_args


@pytest.fixture(scope="module")
def two_checkpoints(tiny_base, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("corrupt") / "run"
    out = sdpo("train", *tiny_args(tiny_base, run_dir, "train.epochs=2", "train.keep_checkpoints=2"))
    assert out.returncode == 0, out.stderr[-3000:]
    return run_dir


@pytest.mark.slow
def test_corrupt_latest_resumes_from_the_older_good_one(two_checkpoints, tiny_base):
    """epoch_0001's weights are truncated: --resume warns, sets it aside as epoch_0001.corrupt, resumes
    from epoch_0000 and finishes; pruning (keep=1) never deletes the good checkpoint it resumed from
    before the new one is written."""
    import shutil

    run_dir = two_checkpoints.parent / "latest-bad"
    shutil.copytree(two_checkpoints, run_dir)
    weights = run_dir / "checkpoints" / "epoch_0001" / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    out = sdpo("train", *tiny_args(tiny_base, run_dir, "train.epochs=3", "train.keep_checkpoints=1"), "--resume")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "skipping checkpoint" in out.stderr and "weights.safetensors has 100 bytes" in out.stderr
    assert "starting at epoch 1" in out.stderr
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert names == ["epoch_0001.corrupt", "epoch_0002"]
    epochs = [json.loads(x)["epoch"] for x in (run_dir / "train_metrics.jsonl").read_text().splitlines()]
    assert epochs == [0, 1, 2]


@pytest.mark.slow
def test_no_good_checkpoint_exits_2_naming_the_file(two_checkpoints, tiny_base):
    """Every checkpoint's state.json truncated (was: json.decoder.JSONDecodeError, exit 1): exit 2 with
    the file, what was found, and what to do."""
    import shutil

    run_dir = two_checkpoints.parent / "all-bad"
    shutil.copytree(two_checkpoints, run_dir)
    for state in (run_dir / "checkpoints").glob("*/state.json"):
        state.write_text(state.read_text()[:5])
    out = sdpo("train", *tiny_args(tiny_base, run_dir, "train.epochs=3"), "--resume")
    assert out.returncode == 2, out.stderr[-3000:]
    assert "epoch_0001: state.json has 5 bytes, the manifest says" in out.stderr
    assert "remove that folder" in out.stderr and "Traceback" not in out.stderr


CHANGES = [("model.lora_rank", 4, 8), ("sample.num_steps", 2, 3), ("train.method", "'sdpo'", "ddpo"),
           ("train.stat_tracking.buffer_size", 8, 4)]


@pytest.mark.slow
def test_resume_with_state_shaping_changes_exits_2(two_checkpoints, tiny_base):
    """--resume with keys that fix the saved state changed (was: a raw `size mismatch` / ValueError
    traceback from deep code): exit 2 naming each key with the old and the new value, before any
    model is built; the checkpoints are untouched. (One process for the four keys: each is its own line.)"""
    before = sorted(p.name for p in (two_checkpoints / "checkpoints").iterdir())
    sets = [f"{key}={new}" for key, _, new in CHANGES]
    out = sdpo("train", *tiny_args(tiny_base, two_checkpoints, "train.epochs=3", *sets), "--resume")
    assert out.returncode == 2, out.stderr[-3000:]
    for key, old, new in CHANGES:
        shown_new = f"'{new}'" if isinstance(new, str) else new
        assert f"{key}: {old} in the checkpoint, {shown_new} now" in out.stderr
    assert "Traceback" not in out.stderr and "learning_rate" not in out.stdout  # refused before start
    assert sorted(p.name for p in (two_checkpoints / "checkpoints").iterdir()) == before
