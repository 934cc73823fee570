"""The sampler interface (docs/architecture.md): one stochastic denoising step with its Gaussian log-prob.

A sampler is built from the model's scheduler config and the number of steps, and is used by
sampling, training and evaluation alike, so training always scores exactly the transition that
was sampled and evaluation samples exactly the way training did. It is the only place that
mirrors a diffusers scheduler's math, and each sampler is tested against its scheduler's own
``step`` given the same noise.

    sampler = DDIMSampler(scheduler_config, num_steps=4, eta=1.0, last_step="clamp")
    x = noise
    for i, t in enumerate(sampler.timesteps):
        out = family.denoise(model, x, t, cond)
        x, x0, log_prob = sampler.step(out, torch.full((n,), i), x, generator=gen)
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, NamedTuple

import torch


class StepOutput(NamedTuple):
    prev_sample: torch.Tensor  # (N, C, h, w) x_{t-1}, in the dtype of ``sample``
    x0: torch.Tensor  # (N, C, h, w) the predicted clean latent at this step (dual state)
    log_prob: torch.Tensor  # (N,) float32: log N(prev_sample; mean, std^2), averaged over C*h*w


class Transition(NamedTuple):
    """A step's Gaussian N(mean, std^2) over x_{t-1} and its predicted clean latent, before any draw."""

    mean: torch.Tensor  # (N, C, h, w) float32
    std: torch.Tensor  # (N, 1, 1, 1) float32; 0 for a deterministic step
    x0: torch.Tensor  # (N, C, h, w) float32: the dual state ``StepOutput.x0``


class Sampler(ABC):
    """``num_steps`` steps; step ``i`` goes from ``timesteps[i]`` towards the next one."""

    def __init__(self, scheduler_config: dict[str, Any], num_steps: int) -> None:
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        self.scheduler_config = dict(scheduler_config)
        self.num_steps = num_steps

    @classmethod
    def options_from_config(cls, sample_cfg: Any, model_cfg: Any) -> dict[str, Any]:
        """This sampler's constructor options from the ``sample`` / ``model`` config sections."""
        return {}

    @property
    @abstractmethod
    def timesteps(self) -> torch.Tensor:
        """(T,) on the CPU: the timestep of each step, in the units the family's denoiser takes."""

    @abstractmethod
    def step(
        self,
        model_output: torch.Tensor,
        step_index: torch.Tensor,
        sample: torch.Tensor,
        prev_sample: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
    ) -> StepOutput:
        """One step for N items that may sit at different steps (step-shuffled training).

        Args:
            model_output: (N, C, h, w) the denoiser's native output at x_t.
            step_index: (N,) long on the CPU (or a scalar), the index i of each item's step.
            sample: (N, C, h, w) x_t.
            prev_sample: if given, only score this x_{t-1} (training); else draw it.
            generator / noise: randomness of the draw; ``noise`` (N, C, h, w) wins if given. A CPU
                generator's noise is the same on every device.
        Math and log-probs run in float32 even under autocast (tiny variances at late steps).
        """

    @abstractmethod
    def transition(self, model_output: torch.Tensor, step_index: torch.Tensor, sample: torch.Tensor) -> Transition:
        """The distribution ``step`` draws x_{t-1} from (and scores it under), and x0, without drawing or
        checking anything: (N, C, h, w) output and x_t, (N,) or scalar step indices. Its mean and x0 are
        affine in ``model_output`` (before x0 clipping, which these samplers leave off by default): the
        per-step Gaussian KL (``rl.losses.gaussian_kl``) and DiffusionNFT's policy mixing build on that."""

    @abstractmethod
    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, step_index: torch.Tensor) -> torch.Tensor:
        """The forward process q(x_t | x0) at each item's step ``step_index`` (N,) or a scalar, with the
        model's own schedule: x0, noise (N, C, h, w) -> x_t (N, C, h, w) float32 (the scheduler's
        ``add_noise`` / ``scale_noise`` at that step's timestep)."""
