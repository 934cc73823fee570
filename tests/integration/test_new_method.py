"""A new RL method is one file: toy methods defined here (groups of 3 trajectories per prompt,
independent or shared x_T, scored alone or as a group) train through the unchanged trainer."""

from __future__ import annotations

import pytest
import torch

from sdpo_core.config import ConfigError
from sdpo_core.methods import METHODS
from sdpo_core.methods.method import Method
from sdpo_core.rl.advantages import group_normalise
from sdpo_core.rl.losses import ddpo_loss
from sdpo_core.training.trainer import Trainer


class Triples(Method):
    """Three trajectories per prompt from their own x_T, each its own item; the final reward
    normalised within the prompt's group; PPO-clip; DDPO's update loop."""

    name = "triples"
    trajectories_per_prompt = 3
    shared_noise = False
    trajectories_per_item = 1
    update_schedule = "per_trajectory"
    uses_stat_tracker = False

    @property
    def tracked_steps(self):
        return 1

    def scored_steps(self, x0):
        return torch.full((x0.shape[0], 1), x0.shape[1] - 1), {}

    def returns(self, rewards_queried, extras):
        return rewards_queried[:, -1:].float()

    def advantages(self, prompts, returns, stat_tracker):
        return group_normalise(prompts, returns)

    def loss(self, log_probs_new, log_probs_old, advantages, weights):
        return ddpo_loss(log_probs_new[0], log_probs_old[0], advantages[0], self.train.clip_range,
                         self.train.adv_clip_max)


class JointTriples(Triples):
    """The same three trajectories from one shared x_T, trained as one item (a step-position update loop)."""

    name = "joint-triples"
    shared_noise = True
    trajectories_per_item = 3
    update_schedule = "per_step"
    item_noun = "triples"

    def loss(self, log_probs_new, log_probs_old, advantages, weights):
        parts = [ddpo_loss(n, o, a, self.train.clip_range, self.train.adv_clip_max)
                 for n, o, a in zip(log_probs_new, log_probs_old, advantages, strict=True)]
        diag = {k: torch.stack([d[k] for _, d in parts]).mean() for k in parts[0][1]}
        return torch.stack([loss for loss, _ in parts]).mean(), diag


def _config(tiny_cfg, monkeypatch, method: type[Method], **train):
    monkeypatch.setitem(METHODS, method.name, method)  # the registry's one line
    # validated like any method: the config reads the names and batch checks from METHODS
    return tiny_cfg("sample.num_steps=2", "sample.batch_size=2", "sample.num_batches_per_epoch=2",
                    "train.batch_size=2", f"train.method={method.name}", *(f"train.{k}={v}" for k, v in train.items()))


@pytest.mark.parametrize("method", [Triples, JointTriples], ids=["independent", "shared-joint"])
def test_a_method_defined_in_one_file_trains_through_the_trainer(tiny_cfg, tmp_path, monkeypatch, method):
    cfg = _config(tiny_cfg, monkeypatch, method)
    tr = Trainer(cfg, tmp_path)
    plan = tr.plan
    # 2 batches x 2 prompts x 3 trajectories; items: 12 single trajectories or 4 triples
    assert plan.trajectories_per_process == 12
    assert plan.train_items_per_process == (12 if method is Triples else 4)
    samples = tr.sample_epoch(0).samples
    k_item = method.trajectories_per_item
    assert len(samples.latents) == len(samples.log_probs) == len(samples.advantages) == k_item
    assert len(samples.cond) == len(samples.prompts) == plan.train_items_per_process
    x_T = [lat[:, 0] for lat in samples.latents]
    if method is JointTriples:  # the group's three trajectories start from one x_T, then differ
        assert torch.equal(x_T[0], x_T[1]) and torch.equal(x_T[0], x_T[2])
        assert not torch.equal(samples.latents[0][:, -1], samples.latents[1][:, -1])
    else:  # every trajectory from its own x_T; each prompt's group of 3 normalised to mean 0
        assert len({tuple(x.flatten().tolist()) for x in x_T[0]}) == 12
        for p in set(samples.prompts):
            rows = [i for i, q in enumerate(samples.prompts) if q == p]
            assert len(rows) % 3 == 0
            assert abs(float(samples.advantages[0][rows, 0].mean())) < 1e-4
    before = tr.trainable_state()
    tr.run()
    after = tr.trainable_state()
    assert any(not torch.equal(before[k], after[k]) for k in before), "no weight was updated"
    lines = (tmp_path / "train_metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 and "reward/last" in lines[0]
    assert tr.global_step == 2 * plan.optimizer_steps_per_epoch


def test_a_new_method_brings_its_own_batch_checks(tiny_cfg, monkeypatch):
    # refused when the config loads, by the method's own arithmetic (4 triples per process)
    with pytest.raises(ConfigError, match=r"train.batch_size=3 does not divide the 4 triples each process"):
        _config(tiny_cfg, monkeypatch, JointTriples, batch_size=3)
