"""A reward that returns NaN stops the epoch before any training on it; the checkpoint stays good."""

import pytest
import torch

from sdpo_core.rewards import RewardError
from sdpo_core.training.checkpoint import checkpoint_dirs, load_checkpoint
from sdpo_core.training.trainer import Trainer


def test_nan_reward_stops_epoch_and_keeps_last_checkpoint(tiny_cfg, tmp_path):
    import reward_fixtures

    reward_fixtures.CALLS["n"] = 0
    tr = Trainer(tiny_cfg("reward.name=reward_fixtures:nan_after_first_epoch", "train.epochs=3"), tmp_path)
    with pytest.raises(RewardError, match="reward_fixtures:nan_after_first_epoch.*non-finite"):
        tr.run()
    assert [d.name for d in checkpoint_dirs(tmp_path)] == ["epoch_0000"]
    saved = load_checkpoint(checkpoint_dirs(tmp_path)[0]).weights
    now = tr.trainable_state()
    # nothing of the failed epoch was trained on: the weights are still epoch 0's
    assert all(torch.equal(saved[k], now[k]) for k in saved)
    assert not (tmp_path / "final").exists()


def test_combined_user_rewards_train_and_log_components(tiny_cfg, tmp_path):
    import json

    options = ("reward.options={components: [{name: 'reward_fixtures:brightness', weight: 1.0}, "
               "{name: jpeg_compressibility, weight: 0.5}]}")
    final = Trainer(tiny_cfg("reward.name=combine", options, "train.epochs=1"), tmp_path).run()
    assert (final / "pytorch_lora_weights.safetensors").is_file()
    stats = json.loads((tmp_path / "train_metrics.jsonl").read_text().splitlines()[0])
    parts = {k for k in stats if k.startswith("reward_component/")}
    assert parts == {"reward_component/reward_fixtures:brightness", "reward_component/jpeg_compressibility"}
