"""Checkpoint files and the background writer, on small hand-made states."""

from __future__ import annotations

import pytest
import torch

from sdpo_core.training.checkpoint import (
    CheckpointState,
    CheckpointWriter,
    checkpoint_dirs,
    latest_checkpoint,
    load_checkpoint,
)


def _state(epoch: int, value: float) -> CheckpointState:
    return CheckpointState(
        epoch=epoch, global_step=3 * (epoch + 1), weights={"w": torch.full((2, 3), value)},
        optimizer={"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.ones(2, 3)}}, "param_groups": []},
        tracker=None, rng={"torch": torch.get_rng_state()}, config_yaml="seed: 1\n",
    )


@pytest.mark.parametrize("background", [True, False])
def test_writer_writes_keeps_the_newest_and_reads_back(tmp_path, background):
    writer = CheckpointWriter(background=background)
    for epoch in range(3):
        final = writer.submit(tmp_path, _state(epoch, float(epoch)), keep=2)
        assert final.name == f"epoch_{epoch:04d}"
    writer.close()
    assert [d.name for d in checkpoint_dirs(tmp_path)] == ["epoch_0001", "epoch_0002"]
    back = load_checkpoint(latest_checkpoint(tmp_path))
    assert back.epoch == 2 and back.global_step == 9
    assert torch.equal(back.weights["w"], torch.full((2, 3), 2.0))
    assert torch.equal(back.optimizer["state"][0]["exp_avg"], torch.ones(2, 3))


@pytest.mark.parametrize("background", [True, False])
def test_failed_write_is_raised_and_leaves_no_checkpoint(tmp_path, background):
    writer = CheckpointWriter(background=background)
    writer.submit(tmp_path, _state(0, 0.0), keep=2)
    writer.wait()
    # a plain file where the write's temporary directory goes: the write fails for real
    (tmp_path / "checkpoints" / "epoch_0001.tmp").write_text("not a directory")
    if background:
        writer.submit(tmp_path, _state(1, 1.0), keep=2)  # returns at once; the error comes at wait
        with pytest.raises(NotADirectoryError):
            writer.wait()
    else:
        with pytest.raises(NotADirectoryError):
            writer.submit(tmp_path, _state(1, 1.0), keep=2)
    assert latest_checkpoint(tmp_path).name == "epoch_0000"
    writer.wait()  # the error was reported once
    writer.close()


def _write(run_dir, epochs, keep=5):
    writer = CheckpointWriter(background=False)
    for epoch in epochs:
        writer.submit(run_dir, _state(epoch, float(epoch)), keep=keep)
    writer.close()


def test_manifest_is_written_last_and_detects_truncation_and_bit_flips(tmp_path):
    import json

    from sdpo_core.training.checkpoint import verify_checkpoint

    _write(tmp_path, [0])
    ckpt = latest_checkpoint(tmp_path)
    manifest = json.loads((ckpt / "manifest.json").read_text())["files"]
    # every file but the manifest is listed (bug caught: a file written after the manifest is unverified)
    assert set(manifest) == {p.name for p in ckpt.iterdir()} - {"manifest.json"}
    assert verify_checkpoint(ckpt) is None
    w = ckpt / "weights.safetensors"
    data = w.read_bytes()
    w.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # same size, one bit flipped
    assert "sha256" in verify_checkpoint(ckpt)
    w.write_bytes(data[:10])
    assert "weights.safetensors has 10 bytes" in verify_checkpoint(ckpt)
    (ckpt / "manifest.json").unlink()
    assert "no manifest.json" in verify_checkpoint(ckpt)


def test_corrupt_latest_is_skipped_for_the_newest_good_one(tmp_path, caplog):
    from sdpo_core.training.checkpoint import plan_resume

    _write(tmp_path, [0, 1, 2])
    (tmp_path / "checkpoints" / "epoch_0002" / "state.json").write_text('{"epo')  # truncated
    with caplog.at_level("WARNING"):
        assert latest_checkpoint(tmp_path).name == "epoch_0001"
    assert "epoch_0002" in caplog.text and "state.json" in caplog.text
    good, bad = plan_resume(tmp_path, "seed: 1\n", resume=True)
    assert good.name == "epoch_0001" and [d.name for d, _ in bad] == ["epoch_0002"]


def test_resume_with_no_good_checkpoint_names_the_file(tmp_path):
    from sdpo_core.training.checkpoint import ResumeError, plan_resume

    _write(tmp_path, [0])
    (tmp_path / "checkpoints" / "epoch_0000" / "optimizer.pt").write_bytes(b"")
    with pytest.raises(ResumeError, match=r"epoch_0000: optimizer.pt has 0 bytes, the manifest says \d+"):
        plan_resume(tmp_path, "seed: 1\n", resume=True)
    # without --resume: refused before anything is built (bug caught: corrupt dirs invisible to the check)
    with pytest.raises(ResumeError, match="--resume"):
        plan_resume(tmp_path, "seed: 1\n", resume=False)


def test_config_change_that_shapes_the_state_is_refused_with_old_and_new(tmp_path):
    import yaml

    from sdpo_core.training.checkpoint import ResumeError, check_compatible

    cfg = {"model": {"lora_rank": 4, "finetune": "lora"}, "sample": {"num_steps": 2},
           "train": {"method": "sdpo", "epochs": 2, "stat_tracking": {"buffer_size": 8}}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    more_epochs = {**cfg, "train": {**cfg["train"], "epochs": 5}}
    check_compatible(tmp_path, yaml.safe_dump(more_epochs))  # epochs is not a state key: allowed
    changed = {**cfg, "model": {"lora_rank": 8, "finetune": "lora"},
               "train": {**cfg["train"], "stat_tracking": {"buffer_size": 16}}}
    with pytest.raises(ResumeError) as err:
        check_compatible(tmp_path, yaml.safe_dump(changed))
    msg = str(err.value)
    assert "model.lora_rank: 4 in the checkpoint, 8 now" in msg
    assert "train.stat_tracking.buffer_size: 8 in the checkpoint, 16 now" in msg
    assert "--set model.lora_rank=4" in msg and "sample.num_steps" not in msg


def test_keep_never_prunes_the_checkpoint_just_written(tmp_path):
    _write(tmp_path, [0, 1, 2], keep=1)
    assert [d.name for d in checkpoint_dirs(tmp_path)] == ["epoch_0002"]
    assert load_checkpoint(latest_checkpoint(tmp_path)).epoch == 2
