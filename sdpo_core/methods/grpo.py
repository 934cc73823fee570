"""GRPO as Flow-GRPO and DanceGRPO run it on diffusion models: G trajectories per prompt, each
from its own x_T, final rewards normalised within the prompt's group, PPO-clip at every step.

The KL penalty to the reference model those papers describe is off in their few-step recipes
(Flow-GRPO's ``train.beta`` defaults to 0) and is not implemented here.
"""

from __future__ import annotations

import numpy as np

from sdpo_core.rl.advantages import group_normalise
from sdpo_core.methods.ddpo import DDPO


class GRPO(DDPO):
    """DDPO's final reward, loss (PPO-clip) and update loop; GRPO's prompts and advantages."""

    name = "grpo"
    uses_stat_tracker = False

    def epoch_prompts(self, rng: np.random.Generator, train_prompts: list[str], num_batches: int,
                      batch_size: int) -> list[list[str]]:
        """Epoch's prompts as G/2 copies of each group's prompt (every prompt of a batch is sampled
        twice), groups in a random order and cut into batches: a group may span two batches."""
        half = self.train.grpo.group_size // 2
        groups = num_batches * batch_size // half
        # distinct prompts while the set allows it (a prompt drawn twice would just form one larger group)
        idx = rng.choice(len(train_prompts), groups, replace=groups > len(train_prompts))
        flat = [train_prompts[i] for i in np.repeat(idx, half)]
        return [flat[k * batch_size:(k + 1) * batch_size] for k in range(num_batches)]

    def advantages(self, prompts, returns, stat_tracker):
        return group_normalise(prompts, returns, self.train.grpo.std)
