"""Rewards served by ``sdpo reward-server`` in test_reward_server_limits (``reward_server_fns:NAME``)."""

from __future__ import annotations

import time

import torch

SCORE_SECONDS = 0.3  # long enough that requests sent together queue behind the first call


def slow_score(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """(N,) a weighted mean of each image's pixels times a prompt factor, after SCORE_SECONDS."""
    time.sleep(SCORE_SECONDS)
    weights = torch.linspace(0.5, 1.5, images.shape[-1])
    return (images.float() * weights).mean(dim=(1, 2, 3)) * torch.tensor([1.0 + len(p) for p in prompts])
