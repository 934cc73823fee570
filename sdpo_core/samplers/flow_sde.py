"""Stochastic flow-matching steps with log-probs, for ``FlowMatchEulerDiscreteScheduler`` models
(SD3 / SD3.5, FLUX): Flow-GRPO's SDE step and coefficients-preserving sampling (CPS).

Conventions (rectified flow): ``x_t = (1 - s) x0 + s * noise`` with ``s = sigma in [0, 1]``; the
denoiser predicts the velocity ``v = noise - x0``, so ``x0 = x_t - s v`` and the predicted noise is
``eps = x_t + (1 - s) v``. A step goes from ``s = sigmas[i]`` to ``s' = sigmas[i + 1]``
(``dt = s' - s < 0``); the schedule ends at 0. With ``noise_level = 0`` both step types are the
deterministic Euler step ``x_t + dt * v`` that ``FlowMatchEulerDiscreteScheduler.step`` takes.

``sde_type="sde"`` (Flow-GRPO, Liu et al. 2025, the Euler-Maruyama discretisation of the reverse
SDE  dx = [v + sigma_t^2 / (2 s) (x + (1 - s) v)] dt + sigma_t dw  with sigma_t = a sqrt(s / (1 - s))):

    std_t = a * sqrt(s / (1 - s))
    mean  = x_t (1 + std_t^2 / (2 s) dt) + v (1 + std_t^2 (1 - s) / (2 s)) dt
    x'    = mean + std_t sqrt(-dt) * z

  * at s = 1 (the first step of every schedule that starts at pure noise) s / (1 - s) is infinite:
    ``sigma_max`` replaces that 1 in the denominator (None: the schedule's second sigma, as
    Flow-GRPO's ``sigma_max = sigmas[1]`` does; a 1-step schedule's second sigma is 0, so its
    std_t is a). The numerator keeps s = 1.
  * at the last step (s' = 0) the step stays stochastic: std_t comes from s > 0 and -dt = s > 0,
    so the final sample carries noise of std a * sqrt(s / (1 - s)) * sqrt(s) and a finite log-prob
    (the counterpart of DDIM's ``last_step="clamp"``; a 1-step model keeps a policy gradient).

``sde_type="cps"`` (coefficients-preserving sampling, Wang et al. 2025, "Coefficients-Preserving
Sampling for Reinforcement Learning with Flow Matching"; as in Flow-GRPO's and Flow-Factory's
``cps``): the predicted x0 and eps are recombined at s' so that x' has exactly the coefficients
of ``x_{s'} = (1 - s') x0 + s' eps``, part of the noise being replaced by fresh noise:

    std_t = s' * sin(a * pi / 2)
    mean  = (1 - s') x0 + sqrt(s'^2 - std_t^2) eps
    x'    = mean + std_t * z

  The last step (s' = 0) is deterministic (std 0): x' = x0.

A zero-variance transition (noise_level 0, or CPS's last step) is a point mass: ``x'`` is the mean
and its log-prob is reported as 0 (no ratio, so no policy gradient, from that step). Everything
runs in float32 (log-densities of std ~1e-2 transitions are meaningless in half precision).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from sdpo_core.samplers.common import gaussian_log_prob, per_item, step_indices, step_noise
from sdpo_core.samplers.sampler import Sampler, StepOutput, Transition

SDE_TYPES = ("sde", "cps")
SIGMA_SCHEDULES = ("scheduler", "uniform")


def calculate_shift(image_seq_len: int, base_seq_len: int, max_seq_len: int, base_shift: float,
                    max_shift: float) -> float:
    """FLUX's resolution-dependent shift ``mu``: linear in the number of image tokens, equal to
    ``base_shift`` at ``base_seq_len`` tokens and ``max_shift`` at ``max_seq_len``."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return base_shift + slope * (image_seq_len - base_seq_len)


def flow_sigmas(scheduler_config: dict[str, Any], num_steps: int, mu: float | None = None,
                schedule: str = "scheduler", image_seq_len: int | None = None) -> torch.Tensor:
    """(T + 1,) float32 sigmas ending in 0, as diffusers' scheduler sets them.

    ``schedule="scheduler"``: ``set_timesteps(num_steps)`` (what StableDiffusion3Pipeline does);
    ``"uniform"``: ``set_timesteps(sigmas=linspace(1, 1/T, T))`` (what FluxPipeline does). A config
    with ``use_dynamic_shifting`` needs the shift: ``mu``, or ``image_seq_len`` (the number of image
    tokens the denoiser sees, which the model family reports) to compute it as the pipelines do
    (``calculate_shift``); ``mu`` wins when both are given.
    """
    if schedule not in SIGMA_SCHEDULES:
        raise ValueError(f"sigma schedule {schedule!r} not in {SIGMA_SCHEDULES}")
    sched = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
    cfg = sched.config
    if cfg.use_dynamic_shifting and mu is None:
        if image_seq_len is None:
            raise ValueError("this scheduler config has use_dynamic_shifting: true, so the sampler needs `mu` "
                             "or `image_seq_len` (see Family.sampler_options)")
        mu = calculate_shift(image_seq_len, cfg.base_image_seq_len, cfg.max_image_seq_len, cfg.base_shift,
                             cfg.max_shift)
    if cfg.invert_sigmas:
        raise ValueError("invert_sigmas schedulers (Mochi) are not supported by the flow SDE sampler")
    kwargs = {"mu": mu} if mu is not None else {}
    if schedule == "uniform":
        sched.set_timesteps(sigmas=np.linspace(1.0, 1.0 / num_steps, num_steps).tolist(), **kwargs)
    else:
        sched.set_timesteps(num_steps, **kwargs)
    return sched.sigmas.to(torch.float32).cpu()


def sde_coefficients(sigma: torch.Tensor, sigma_next: torch.Tensor, sigma_max: float,
                     noise_level: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flow-GRPO's SDE step as ``mean = c_x * x_t + c_v * v`` with noise std ``std``; all (N,).

    Flow-GRPO (Liu et al. 2025), the reverse SDE discretised with Euler-Maruyama:
    std_t = a sqrt(s / (1 - s)) (s = 1 replaced by ``sigma_max`` in the denominator).
    """
    dt = sigma_next - sigma
    denom_sigma = torch.where(sigma >= 1, torch.full_like(sigma, sigma_max), sigma)
    std_t = noise_level * torch.sqrt(sigma / (1 - denom_sigma))
    c_x = 1 + std_t**2 / (2 * sigma) * dt
    c_v = (1 + std_t**2 * (1 - sigma) / (2 * sigma)) * dt
    return c_x, c_v, std_t * torch.sqrt(-dt)


def cps_coefficients(sigma: torch.Tensor, sigma_next: torch.Tensor,
                     noise_level: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CPS (Wang et al. 2025) as ``mean = c_x0 * x0 + c_eps * eps`` with noise std ``std``; all (N,).

    std = s' sin(a pi / 2); c_x0 = 1 - s'; c_eps = sqrt(s'^2 - std^2) = s' cos(a pi / 2), so for
    independent unit eps and z the noise part of x' has std sqrt(c_eps^2 + std^2) = s', as x_{s'} has.
    """
    std = sigma_next * math.sin(noise_level * math.pi / 2)
    c_eps = (sigma_next**2 - std**2).clamp(min=0).sqrt()
    return 1 - sigma_next, c_eps, std


class FlowSDESampler(Sampler):
    """Flow-GRPO SDE or CPS steps over a ``FlowMatchEulerDiscreteScheduler`` schedule.

    Args:
        scheduler_config: the model's scheduler config (``FlowMatchEulerDiscreteScheduler``).
        num_steps: T.
        noise_level: a (Flow-GRPO's default 0.7); 0 gives the deterministic Euler sampler.
        sde_type: ``"sde"`` or ``"cps"`` (module docstring).
        sigma_max: replaces s = 1 in the SDE's ``1 - s``; None = the schedule's second sigma.
        mu: FLUX's dynamic shift (a config with ``use_dynamic_shifting`` needs it or ``image_seq_len``).
        image_seq_len: image tokens the denoiser sees; gives ``mu`` by ``calculate_shift``.
        sigma_schedule: ``"scheduler"`` (SD3 pipeline) or ``"uniform"`` (FLUX pipeline).
    """

    def __init__(self, scheduler_config: dict[str, Any], num_steps: int, noise_level: float = 0.7,
                 sde_type: str = "sde", sigma_max: float | None = None, mu: float | None = None,
                 sigma_schedule: str = "scheduler", image_seq_len: int | None = None) -> None:
        super().__init__(scheduler_config, num_steps)
        if sde_type not in SDE_TYPES:
            raise ValueError(f"sde_type {sde_type!r} not in {SDE_TYPES}")
        if not 0 <= noise_level <= 1:
            raise ValueError(f"noise_level must be in [0, 1], got {noise_level}")
        self.sigmas = flow_sigmas(scheduler_config, num_steps, mu, sigma_schedule, image_seq_len)
        if sigma_max is None:
            sigma_max = float(self.sigmas[1])
        if not 0 <= sigma_max < 1:
            raise ValueError(f"sigma_max must be in [0, 1), got {sigma_max}")
        self.noise_level = float(noise_level)
        self.sde_type = sde_type
        self.sigma_max = float(sigma_max)
        self.num_train_timesteps = int(self.scheduler_config.get("num_train_timesteps", 1000))

    @property
    def timesteps(self) -> torch.Tensor:
        """(T,) float32: sigma * num_train_timesteps, as ``scheduler.timesteps``."""
        return self.sigmas[:-1] * self.num_train_timesteps

    def step(self, model_output: torch.Tensor, step_index: torch.Tensor, sample: torch.Tensor,
             prev_sample: torch.Tensor | None = None, generator: torch.Generator | None = None,
             noise: torch.Tensor | None = None) -> StepOutput:
        """See ``Sampler.step``; ``model_output`` is the flow velocity v = noise - x0."""
        mean, std, x0 = self.transition(model_output, step_index, sample)
        prev = mean + std * step_noise(mean, generator, noise) if prev_sample is None else prev_sample.float()
        log_prob = gaussian_log_prob(prev, mean, std)
        return StepOutput(prev.to(sample.dtype), x0.to(sample.dtype), log_prob)

    def transition(self, model_output: torch.Tensor, step_index: torch.Tensor, sample: torch.Tensor) -> Transition:
        """The SDE or CPS step's Gaussian (module docstring) and x0 = x_t - s v."""
        idx = step_indices(step_index, sample.shape[0], self.num_steps)
        sigma, sigma_next = self.sigmas[idx], self.sigmas[idx + 1]
        x, v = sample.float(), model_output.float()
        s = per_item(sigma, x)
        x0 = x - s * v
        if self.sde_type == "sde":
            c_x, c_v, std = sde_coefficients(sigma, sigma_next, self.sigma_max, self.noise_level)
            mean = per_item(c_x, x) * x + per_item(c_v, x) * v
        else:
            c_x0, c_eps, std = cps_coefficients(sigma, sigma_next, self.noise_level)
            eps = x + (1 - s) * v
            mean = per_item(c_x0, x) * x0 + per_item(c_eps, x) * eps
        return Transition(mean, per_item(std, x), x0)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, step_index: torch.Tensor) -> torch.Tensor:
        """Rectified flow's forward process at the step's sigma s: (1 - s) x0 + s noise (``scale_noise``)."""
        s = per_item(self.sigmas[step_indices(step_index, x0.shape[0], self.num_steps)], x0)
        return (1 - s) * x0.float() + s * noise.float()
