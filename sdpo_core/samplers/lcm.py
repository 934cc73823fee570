"""LCM's multistep sampler with log-probs (mirrors ``diffusers.LCMScheduler.step``, 0.42).

At step i (timestep t, next timestep s) the model output gives x0 by the prediction type, the
consistency boundary condition gives ``denoised = c_out(t) * x0 + c_skip(t) * x_t`` and the next
sample is drawn fresh around it:

    x_s = sqrt(a_s) * denoised + sqrt(1 - a_s) * z,   z ~ N(0, I)

a Gaussian with mean ``sqrt(a_s) * denoised`` and std ``sqrt(1 - a_s)``: that is its log-prob.
diffusers' last step returns ``denoised`` with no noise, which has no log-probability. With
``last_step="renoise"`` (default) the last step instead re-noises to the first training timestep
(``a_s = alphas_cumprod[0]``), the way the SDPO paper keeps DDIM's last step stochastic, so a
1-step LCM is trainable; ``"deterministic"`` is diffusers exactly (for evaluation): drawing it
returns ``denoised`` with a NaN log-prob, and scoring it raises.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from diffusers import LCMScheduler

from sdpo_core.samplers.common import gaussian_log_prob, per_item, step_indices, step_noise
from sdpo_core.samplers.sampler import Sampler, StepOutput, Transition

LAST_STEPS = ("renoise", "deterministic")
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
SIGMA_DATA = 0.5  # LCMScheduler's fixed sigma_data of the boundary condition


def boundary_scalings(scaled_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N,) ``t * timestep_scaling`` -> (c_skip, c_out), each (N,): LCM's boundary condition."""
    c_skip = SIGMA_DATA**2 / (scaled_t**2 + SIGMA_DATA**2)
    c_out = scaled_t / (scaled_t**2 + SIGMA_DATA**2) ** 0.5
    return c_skip, c_out


def predict_x0(prediction_type: str, out: torch.Tensor, x: torch.Tensor, a_t: torch.Tensor) -> torch.Tensor:
    """x0 from the model output; out, x (N, C, h, w), a_t (N, 1, 1, 1) alphas_cumprod at t."""
    if prediction_type == "epsilon":
        return (x - (1 - a_t).sqrt() * out) / a_t.sqrt()
    if prediction_type == "sample":
        return out
    return a_t.sqrt() * x - (1 - a_t).sqrt() * out  # v_prediction


class LCMSampler(Sampler):
    """LCM multistep sampling over ``LCMScheduler.set_timesteps(num_steps)``'s timesteps."""

    def __init__(self, scheduler_config: dict[str, Any], num_steps: int, last_step: str = "renoise") -> None:
        super().__init__(scheduler_config, num_steps)
        if last_step not in LAST_STEPS:
            raise ValueError(f"LCM last_step must be one of {LAST_STEPS}, got {last_step!r}")
        scheduler = LCMScheduler.from_config(self.scheduler_config)
        cfg = scheduler.config
        if cfg.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"LCM prediction_type {cfg.prediction_type!r} not in {PREDICTION_TYPES}")
        if cfg.thresholding:
            raise ValueError("dynamic thresholding is not supported by the log-prob LCM step")
        scheduler.set_timesteps(num_steps)
        self.last_step = last_step
        self.prediction_type = cfg.prediction_type
        self.clip_range = float(cfg.clip_sample_range) if cfg.clip_sample else None
        ts = scheduler.timesteps.to("cpu", torch.long)
        ac = scheduler.alphas_cumprod.to("cpu", torch.float32)
        self._timesteps = ts
        # per-step constants (T,): alphas at t and at the step's target (alphas_cumprod[0] for the last
        # step when re-noising; 1 when deterministic, which only marks it: that step adds no noise)
        self.alpha_t = ac[ts]
        last = ac[:1] if last_step == "renoise" else torch.ones(1)
        self.alpha_prev = torch.cat([ac[ts[1:]], last])
        self.c_skip, self.c_out = boundary_scalings(ts.float() * float(cfg.timestep_scaling))

    @classmethod
    def options_from_config(cls, sample_cfg: Any, model_cfg: Any) -> dict[str, Any]:
        # sample.last_step names DDIM's two behaviours; LCM's counterparts: the paper's stochastic
        # last step (re-noise to t = 0, as clamp does) or diffusers exactly
        return {"last_step": {"clamp": "renoise", "final_alpha": "deterministic"}[sample_cfg.last_step]}

    @property
    def timesteps(self) -> torch.Tensor:
        return self._timesteps

    def step(
        self,
        model_output: torch.Tensor,
        step_index: torch.Tensor,
        sample: torch.Tensor,
        prev_sample: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
    ) -> StepOutput:
        n = sample.shape[0]
        index = step_indices(step_index, n, self.num_steps)
        final = (index == self.num_steps - 1) & (self.last_step == "deterministic")  # (N,) on the CPU
        if prev_sample is not None and bool(final.any()):
            raise ValueError(
                "the deterministic last LCM step has no log-probability; use last_step='renoise' to train on it"
            )
        mean, std, denoised = self.transition(model_output, index, sample)
        if prev_sample is not None:
            prev = prev_sample.float()
        elif bool(final.all()):  # diffusers draws nothing on its last step: keep the generator's stream
            prev = denoised
        else:
            draw = mean + std * step_noise(mean, generator, noise)
            prev = torch.where(per_item(final, mean).bool(), denoised, draw)
        # a deterministic last step has std 0: its log-prob (0 for a point mass) is replaced by NaN below
        log_prob = gaussian_log_prob(prev, mean, std)
        log_prob = torch.where(final.to(log_prob.device), torch.full_like(log_prob, math.nan), log_prob)
        return StepOutput(prev.to(sample.dtype), denoised.to(sample.dtype), log_prob)

    def transition(self, model_output: torch.Tensor, step_index: torch.Tensor, sample: torch.Tensor) -> Transition:
        """N(sqrt(a_s) denoised, 1 - a_s) and ``denoised`` (the boundary-conditioned x0) as the x0."""
        index = step_indices(step_index, sample.shape[0], self.num_steps)
        x, out = sample.float(), model_output.float()
        x0 = predict_x0(self.prediction_type, out, x, per_item(self.alpha_t[index], x))
        if self.clip_range is not None:
            x0 = x0.clamp(-self.clip_range, self.clip_range)
        denoised = per_item(self.c_out[index], x) * x0 + per_item(self.c_skip[index], x) * x
        a_prev = per_item(self.alpha_prev[index], x)
        return Transition(a_prev.sqrt() * denoised, (1 - a_prev).sqrt(), denoised)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, step_index: torch.Tensor) -> torch.Tensor:
        """DDPM's forward process at the step's timestep t: sqrt(a_t) x0 + sqrt(1 - a_t) noise."""
        a_t = per_item(self.alpha_t[step_indices(step_index, x0.shape[0], self.num_steps)], x0)
        return a_t.sqrt() * x0.float() + (1 - a_t).sqrt() * noise.float()
