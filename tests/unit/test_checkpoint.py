"""Checkpoint files and the background writer, on small hand-made states."""

from __future__ import annotations

import pytest
import torch

from sdpo_core.checkpoint import (
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
