"""Training moves the reward: SDPO on the tiny pipeline raises a reward the model can move."""

from __future__ import annotations

import pytest
import reward_fixtures  # tests/ is on sys.path
import torch

from sdpo_core.families import loading
from sdpo_core.generate import generate
from sdpo_core.training.trainer import Trainer


@pytest.mark.slow
def test_mean_reward_goes_up(tiny_cfg, tmp_path):
    # brightness is a global property the tiny UNet's LoRA can move within a few epochs
    cfg = tiny_cfg("train.method=sdpo", "reward.name=reward_fixtures:brightness", "train.epochs=8",
                   "train.learning_rate=3e-3", "sample.batch_size=4", "sample.num_batches_per_epoch=2",
                   "train.batch_size=4", "tracking.log_images_every=100")
    prompts, seeds = ["a handwritten digit 3", "the number seven"] * 8, list(range(100, 116))
    base = loading.load_family(cfg.model.pretrained)
    before = reward_fixtures.brightness(generate(base, prompts, seeds, 2, cfg), prompts)
    tr = Trainer(cfg, tmp_path)
    tr.run()
    after = reward_fixtures.brightness(generate(tr.family, prompts, seeds, 2, cfg), prompts)
    gain = after - before  # paired: the same seeds and prompts
    assert gain.mean() > 4 * gain.std() / len(gain) ** 0.5, (before.mean(), after.mean())
    assert (gain > 0).float().mean() >= 0.75
    # and the per-epoch training reward went up too (train_metrics.jsonl)
    import json

    rows = [json.loads(x) for x in (tmp_path / "train_metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and rows[-1]["reward/last"] > rows[0]["reward/last"]
    assert torch.isfinite(after).all()
