"""What every sampler shares: the Gaussian log-prob of a step, its noise draw and the step-index check.

One home per formula: DDIM, LCM and the flow SDE all draw ``x_{t-1} = mean + std * z`` and score
it with ``gaussian_log_prob``, so a fix here reaches every sampler.
"""

from __future__ import annotations

import math

import torch


def per_item(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(N,) per-item values -> (N, 1, 1, 1) float32 on ``like``'s device, to broadcast against ``like``."""
    return values.reshape(values.shape + (1,) * (like.ndim - values.ndim)).to(like.device, torch.float32)


def step_indices(step_index: torch.Tensor | int, n: int, num_steps: int) -> torch.Tensor:
    """Step indices (N,) or a scalar -> (N,) long on the CPU, each checked to be in [0, num_steps)."""
    index = torch.as_tensor(step_index, device="cpu").long().reshape(-1).expand(n)
    if bool(((index < 0) | (index >= num_steps)).any()):
        raise IndexError(f"step_index {index.tolist()} out of range for {num_steps} steps")
    return index


def step_noise(x: torch.Tensor, generator: torch.Generator | None = None,
               noise: torch.Tensor | None = None) -> torch.Tensor:
    """The standard normal z of a step's draw, (N, C, h, w) float32 on ``x``'s device: ``noise`` if
    given, else drawn on the generator's device (a CPU generator keeps sampling identical across
    devices)."""
    if noise is None:
        where = generator.device if generator is not None else x.device
        noise = torch.randn(x.shape, generator=generator, device=where, dtype=torch.float32)
    return noise.to(x.device, torch.float32)


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """log N(x; mean, std^2) averaged over all but dim 0: x, mean (N, ...), std (N, 1, ...) -> (N,).

    Averaged rather than summed, as the SDPO paper's code does: the scale does not depend on the
    latent size. ``x`` is data (detached); gradients flow through ``mean``. An item whose std is 0
    is a point mass (a deterministic step, x equals the mean): its log-prob is 0.
    """
    safe = torch.where(std > 0, std, torch.ones_like(std))
    lp = -((x.detach() - mean) ** 2) / (2 * safe**2) - torch.log(safe) - 0.5 * math.log(2 * math.pi)
    lp = torch.where(std > 0, lp, torch.zeros_like(lp))
    return lp.mean(dim=tuple(range(1, lp.ndim)))
