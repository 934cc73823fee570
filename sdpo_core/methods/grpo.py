"""GRPO as Flow-GRPO and DanceGRPO run it on diffusion models: G trajectories per prompt, each
from its own x_T, final rewards normalised within the prompt's group, PPO-clip at every step.

The KL penalty to the reference model those papers describe is ``train.kl_beta`` (``Method.batch_loss``),
off by default as in their few-step recipes (Flow-GRPO's ``train.beta`` defaults to 0).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from sdpo_core.methods.ddpo import DDPO
from sdpo_core.rl.advantages import group_normalise


class GRPO(DDPO):
    """DDPO's final reward, loss (PPO-clip) and update loop; GRPO's prompts and advantages."""

    name = "grpo"
    uses_stat_tracker = False

    @classmethod
    def groups(cls, train: Any) -> Any:
        """The config section with ``group_size`` and ``std`` (``train.grpo``; a subclass may read its own)."""
        return train.grpo

    @classmethod
    def check_batches(cls, train: Any, sample: Any) -> None:
        """Also: ``train.<method>.group_size`` divides the epoch's trajectories and is a multiple of the
        k trajectories sampled per prompt of a batch."""
        super().check_batches(train, sample)
        g, k, key = cls.groups(train).group_size, cls.trajectories_per_prompt, f"train.{cls.name}.group_size"
        trajectories = k * sample.batch_size * sample.num_batches_per_epoch
        if trajectories % g:
            raise ValueError(
                f"{key}={g} does not divide the {trajectories} trajectories each process "
                f"samples per epoch ({k} x sample.batch_size={sample.batch_size} x sample.num_batches_per_epoch="
                f"{sample.num_batches_per_epoch}); choose a group size that divides {trajectories}"
            )
        if g % k:
            raise ValueError(
                f"{key}={g} must be even: the trainer samples each prompt of a "
                "batch twice; choose an even group size"
            )

    def epoch_prompts(self, rng: np.random.Generator, train_prompts: list[str], num_batches: int,
                      batch_size: int) -> list[list[str]]:
        """Epoch's prompts as G/k copies of each group's prompt (every prompt of a batch is sampled
        k times), groups in a random order and cut into batches: a group may span two batches."""
        copies = self.groups(self.train).group_size // self.trajectories_per_prompt
        groups = num_batches * batch_size // copies
        # distinct prompts while the set allows it (a prompt drawn twice would just form one larger group)
        idx = rng.choice(len(train_prompts), groups, replace=groups > len(train_prompts))
        flat = [train_prompts[i] for i in np.repeat(idx, copies)]
        return [flat[j * batch_size:(j + 1) * batch_size] for j in range(num_batches)]

    def advantages(self, prompts, returns, stat_tracker):
        return group_normalise(prompts, returns, self.groups(self.train).std)
