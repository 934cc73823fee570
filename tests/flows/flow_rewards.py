"""Rewards that fail on purpose, for the flow tests (used as ``reward.name=flow_rewards:NAME``)."""

from __future__ import annotations

from pathlib import Path

import torch


def nan_reward(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """A broken reward model: NaN for every image (the trainer's guard must stop the run)."""
    return torch.full((images.shape[0],), float("nan"))


def flaky_reward(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """Fails once, at its first call after the first checkpoint exists (mid-training, like a lost
    worker); fine afterwards. State lives in files of the working directory (the test project)."""
    marker = Path("flaky_reward_failed")
    if not marker.exists() and any(Path("runs/tiny-random/checkpoints").glob("epoch_*")):
        marker.touch()
        raise RuntimeError("flaky reward: simulated failure after the first checkpoint")
    return images.mean(dim=(1, 2, 3))


def brightness(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """Mean pixel value: a reward one epoch of tiny-random at a high learning rate clearly improves
    (the first registered version must beat the base model to become champion)."""
    return images.mean(dim=(1, 2, 3))
