"""The RL-method interface (DESIGN §3): what the trainer asks of SDPO, DDPO (and later GRPO).

A method is a strategy object: the trainer's loop never branches on ``train.method``. Per
sampling batch of B prompts the trainer samples N = 2B trajectories (``paired``: the two of a
prompt share x_T) and asks the method which x0 states to score; per epoch it hands the method the
queried rewards to turn into per-trajectory returns; per training micro-batch it asks for the
loss of an item. Items are what a training row holds: a pair (SDPO) or one trajectory (DDPO).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import numpy as np
import torch

from sdpo_core.rl.advantages import batch_normalise


class Method(ABC):
    name: ClassVar[str]
    #: the two trajectories of a prompt start from the same x_T
    paired: ClassVar[bool]
    #: trajectories per training item (2: a pair scored jointly; 1: each trajectory alone)
    trajectories_per_item: ClassVar[int]
    #: advantages from the per-step, per-prompt stat tracker (train.stat_tracking) across epochs
    uses_stat_tracker: ClassVar[bool] = True

    def __init__(self, train: Any, num_steps: int) -> None:
        """``train``: the ``TrainConfig`` (not imported: the config schema imports no method code)."""
        self.train, self.num_steps = train, num_steps

    @property
    @abstractmethod
    def tracked_steps(self) -> int:
        """Columns of the returns the stat tracker normalises (T for dense, 1 for a final reward)."""

    @abstractmethod
    def scored_steps(self, x0: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Which x0 states to decode and score: x0 (N, T, C, H, W) -> (steps (N, Q) long, extras
        (CPU tensors the method needs again in ``returns``, e.g. the anchor and similarities))."""

    @abstractmethod
    def returns(self, rewards_queried: torch.Tensor, extras: dict[str, torch.Tensor]) -> torch.Tensor:
        """(N, Q) measured rewards -> (N, tracked_steps) float32 returns to normalise."""

    @abstractmethod
    def loss(self, log_probs_new: list[torch.Tensor], log_probs_old: list[torch.Tensor],
             advantages: list[torch.Tensor], weights: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Loss of b items: one (b,) tensor per trajectory of an item in each list; ``weights`` (b,)
        the temporal weights of the items' steps. Returns (scalar loss, diagnostics)."""

    def epoch_prompts(self, rng: np.random.Generator, train_prompts: list[str], num_batches: int,
                      batch_size: int) -> list[list[str]]:
        """The prompts of an epoch's sampling batches (each prompt yields two trajectories):
        drawn uniformly with replacement, batch by batch."""
        return [[train_prompts[i] for i in rng.integers(0, len(train_prompts), batch_size)]
                for _ in range(num_batches)]

    def advantages(self, prompts: list[str], returns: torch.Tensor, stat_tracker: Any) -> torch.Tensor:
        """(N, tracked_steps) returns of all processes' trajectories -> advantages: the stat tracker's
        per-(prompt, step) normalisation, or batch statistics when it is off (``stat_tracker`` None)."""
        if stat_tracker is not None:
            return stat_tracker.update(prompts, returns)
        return batch_normalise(returns)

    def reward_stats(self, rewards_queried: torch.Tensor) -> dict[str, float]:
        """Per-epoch reward metrics from all processes' (N, Q) measured rewards (last column: final)."""
        last = rewards_queried[:, -1]
        return {"reward/last": float(last.mean()), "reward/last_std": float(last.std())}
