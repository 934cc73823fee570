"""DDPO (Black et al. 2023): independent trajectories, the final reward, PPO-clip per step."""

from __future__ import annotations

import torch

from sdpo_core.methods.method import Method
from sdpo_core.rl.losses import ddpo_loss


class DDPO(Method):
    name = "ddpo"
    trajectories_per_prompt = 2
    shared_noise = False
    trajectories_per_item = 1
    # each batch's trained steps accumulated into one update, as DDPO's own loop
    update_schedule = "per_trajectory"

    @property
    def tracked_steps(self) -> int:
        return 1

    def scored_steps(self, x0):
        return torch.full((x0.shape[0], 1), x0.shape[1] - 1), {}

    def returns(self, rewards_queried, extras):
        return rewards_queried[:, -1:].float()

    def loss(self, log_probs_new, log_probs_old, advantages, weights):
        return ddpo_loss(log_probs_new[0], log_probs_old[0], advantages[0], self.train.clip_range,
                         self.train.adv_clip_max)
