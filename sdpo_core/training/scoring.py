"""The reward job of a sampling batch: decode the queried x0 states and score them.

It runs in the trainer's worker thread while the next batch samples (``training/rollout.py``
submits it); its result is a :class:`ScoredBatch`, which the callbacks' ``on_rewards`` also see.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from sdpo_core.rewards import check_rewards

# x0 states the VAE decodes per call in the reward job
DECODE_CHUNK = 8


@dataclass
class ScoredBatch:
    """What the reward job measured for one sampling batch of N trajectories."""

    rewards: torch.Tensor  # (N, Q) float32 on the CPU: the reward of each queried state
    seconds: float  # wall time of the whole job (decode + reward + grid)
    components: dict[str, float]  # mean of each component of a combined reward
    panel: torch.Tensor | None  # (2, K, 3, H, W) uint8: first-step and final x0 of K trajectories, or None
    queried: int  # distinct (trajectory, step) states scored: the reward queries
    decoded: int  # x0 states decoded (the queried ones plus the grid's others)
    decode_seconds: float
    reward_seconds: float


@dataclass
class RewardJob:
    """The parts of the trainer a reward job uses: the family's decoder and the reward."""

    decode: Callable[[torch.Tensor], torch.Tensor]  # (n, C, H, W) latents -> (n, 3, H, W) images in [0, 1]
    reward_fn: Callable[[torch.Tensor, list[str]], torch.Tensor]
    reward_name: str
    device: torch.device

    def __call__(self, x0: torch.Tensor, steps: torch.Tensor, prompts: list[str], grid: int = 0) -> ScoredBatch:
        """Decode x0 at the queried steps and score them.

        x0: (N, T, C, H, W); steps: (N, Q) step indices; prompts: N, one per trajectory. When
        ``grid`` > 0 the result's panel holds the first-step and final x0 images of the first
        ``grid`` trajectories (decoded again only where not queried). Each distinct (trajectory,
        step) is decoded and scored once (T = 1 or 2 repeat steps).
        """
        start = time.perf_counter()
        n, t = x0.shape[:2]
        flat = (torch.arange(n)[:, None] * t + steps).flatten()
        unique, inverse = torch.unique(flat, return_inverse=True)
        # decoded in chunks: at 1024 px a whole batch's queried states would take tens of GB at once
        picked = x0.flatten(0, 1)[unique]
        images = torch.cat([self.decode(c.to(self.device)) for c in picked.split(DECODE_CHUNK)])
        decode_seconds = time.perf_counter() - start
        item_prompts = [prompts[int(i) // t] for i in unique]
        scored_at = time.perf_counter()
        values = check_rewards(self.reward_name, self.reward_fn(images, item_prompts), len(unique))
        reward_seconds = time.perf_counter() - scored_at
        # combined rewards expose each component's values of the last call: log their means
        parts = getattr(self.reward_fn, "last_components", None) or {}
        components = {k: float(v.float().mean()) for k, v in parts.items()}
        panel, extra, extra_seconds = self._panel(x0, unique, images, grid) if grid else (None, 0, 0.0)
        return ScoredBatch(values.cpu()[inverse].reshape(steps.shape), time.perf_counter() - start, components,
                           panel, len(unique), len(unique) + extra, decode_seconds + extra_seconds, reward_seconds)

    def _panel(self, x0: torch.Tensor, unique: torch.Tensor, images: torch.Tensor,
               grid: int) -> tuple[torch.Tensor, int, float]:
        """(2, K, 3, H, W) uint8 first-step and final x0 of the first K = min(grid, N) trajectories,
        the number of states decoded for it and the seconds that took."""
        n, t = x0.shape[:2]
        where = {int(f): j for j, f in enumerate(unique)}
        tiles, extra, seconds = [], 0, 0.0
        for step in (0, t - 1):
            for i in range(min(grid, n)):
                j = where.get(i * t + step)
                if j is not None:
                    tiles.append(images[j])
                    continue
                start = time.perf_counter()
                tiles.append(self.decode(x0[i, step][None].to(self.device))[0])
                seconds += time.perf_counter() - start
                extra += 1
        panel = (torch.stack(tiles).clamp(0, 1) * 255).round().to(torch.uint8).cpu()
        return panel.reshape(2, min(grid, n), *panel.shape[1:]), extra, seconds
