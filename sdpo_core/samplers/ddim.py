"""DDIM with log-probs: ``ddim_step`` (the step's math) and ``DDIMSampler`` (it behind ``Sampler``).

Mirrors ``diffusers.DDIMScheduler.step`` (diffusers 0.35-0.42) for epsilon, v-prediction and
sample prediction, vectorised over a batch whose items may sit at different timesteps (needed
for step-shuffled updates), and adds the Gaussian log-density of ``x_{t-1}`` under the step's
distribution N(mean, sigma_t^2) (DDPO/SDPO: a policy's action log-prob).

The last step (previous timestep < 0) has two behaviours, chosen by ``last_step``:
- ``"clamp"`` (default, the SDPO paper's code): the previous timestep is clamped to 0, so the
  last transition goes to ``alphas_cumprod[0]`` and stays stochastic. This is what gives a
  1-step model a policy gradient at all. It equals diffusers' step when the scheduler has
  ``set_alpha_to_one=False``.
- ``"final_alpha"`` (diffusers exactly): uses ``final_alpha_cumprod``; with
  ``set_alpha_to_one=True`` that is 1 and the last step is deterministic, which has no
  log-probability, so ``ddim_step`` raises rather than return an infinite one.
Both sampling and training go through this function, so training always scores exactly the
transition that was sampled.

The schedule (timesteps, alphas) comes from a ``diffusers.DDIMScheduler`` rebuilt from the
model's own scheduler config (DDIM, Euler, Euler ancestral, PNDM or DPM-Solver configs all carry
the same betas, prediction type and spacing).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from diffusers import DDIMScheduler

from sdpo_core.samplers.common import gaussian_log_prob, per_item, step_indices, step_noise
from sdpo_core.samplers.sampler import Sampler, StepOutput, Transition

LAST_STEPS = ("clamp", "final_alpha")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


@dataclass(frozen=True)
class DDIMParams:
    """The constants of a DDIM schedule that ``ddim_step`` needs (no scheduler object)."""

    alphas_cumprod: torch.Tensor  # (num_train_timesteps,) float32
    final_alpha_cumprod: float
    num_train_timesteps: int
    num_inference_steps: int
    prediction_type: str
    clip_sample: bool = False
    clip_sample_range: float = 1.0
    last_step: str = "clamp"

    @classmethod
    def from_scheduler(
        cls, scheduler, num_inference_steps: int | None = None, last_step: str = "clamp"
    ) -> DDIMParams:
        """Read the constants of a diffusers ``DDIMScheduler`` after ``set_timesteps``."""
        n = num_inference_steps or scheduler.num_inference_steps
        if n is None:
            raise ValueError("call scheduler.set_timesteps(n) first or pass num_inference_steps")
        cfg = scheduler.config
        if cfg.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type {cfg.prediction_type!r} not in {PREDICTION_TYPES}")
        if getattr(cfg, "thresholding", False):
            raise ValueError("dynamic thresholding is not supported by the log-prob DDIM step")
        return cls(
            alphas_cumprod=scheduler.alphas_cumprod.to(torch.float32).cpu(),
            final_alpha_cumprod=float(scheduler.final_alpha_cumprod),
            num_train_timesteps=int(cfg.num_train_timesteps),
            num_inference_steps=int(n),
            prediction_type=cfg.prediction_type,
            clip_sample=bool(cfg.clip_sample),
            clip_sample_range=float(getattr(cfg, "clip_sample_range", 1.0)),
            last_step=last_step,
        )


def _alphas(params: DDIMParams, timesteps: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N,) alphas_cumprod at each item's t and at its previous timestep (``last_step`` rule), on the CPU."""
    t = torch.as_tensor(timesteps, device="cpu").long().reshape(-1).expand(n)
    prev_t = t - params.num_train_timesteps // params.num_inference_steps
    ac = params.alphas_cumprod
    if params.last_step == "clamp":
        return ac[t], ac[prev_t.clamp(min=0)]
    return ac[t], torch.where(prev_t >= 0, ac[prev_t.clamp(min=0)], torch.tensor(params.final_alpha_cumprod))


def ddim_transition(params: DDIMParams, model_output: torch.Tensor, timesteps: torch.Tensor,
                    sample: torch.Tensor, eta: float) -> Transition:
    """The Gaussian of one DDIM step and its x0 (``ddim_step``'s arguments; no draw, no checks)."""
    alpha_t, alpha_prev = _alphas(params, timesteps, sample.shape[0])
    # log-probs, ratios and the step itself in float32 even under autocast: tiny variances
    # (sigma_t ~ 1e-2 at late steps) make half-precision log-densities meaningless.
    x = sample.float()
    out = model_output.float()
    a_t, a_prev = per_item(alpha_t, x), per_item(alpha_prev, x)
    b_t = 1 - a_t
    if params.prediction_type == "epsilon":
        x0 = (x - b_t.sqrt() * out) / a_t.sqrt()
        eps = out
    elif params.prediction_type == "sample":
        x0 = out
        eps = (x - a_t.sqrt() * x0) / b_t.sqrt()
    else:  # v_prediction
        x0 = a_t.sqrt() * x - b_t.sqrt() * out
        eps = a_t.sqrt() * out + b_t.sqrt() * x
    if params.clip_sample:
        x0 = x0.clamp(-params.clip_sample_range, params.clip_sample_range)
    # DDIM paper eq. 16: sigma_t^2 = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
    variance = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
    std = eta * variance.clamp(min=0).sqrt()
    direction = (1 - a_prev - std**2).clamp(min=0).sqrt() * eps
    return Transition(a_prev.sqrt() * x0 + direction, std, x0)


def ddim_step(
    params: DDIMParams,
    model_output: torch.Tensor,
    timesteps: torch.Tensor,
    sample: torch.Tensor,
    eta: float,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One DDIM step x_t -> x_{t-1} with its log-probability.

    Args:
        model_output: (N, C, H, W) the UNet's output (epsilon, v or x0 by ``prediction_type``).
        timesteps: (N,) or scalar integer timesteps t of each item.
        sample: (N, C, H, W) the noisy latent x_t.
        eta: DDIM eta in (0, 1]; sigma_t = eta * sqrt(variance) (DDIM paper eq. 16).
        prev_sample: (N, C, H, W) if given, only score this x_{t-1} (training); else sample it.
        generator / noise: randomness for sampling x_{t-1}; ``noise`` (N, C, H, W) wins if given.

    Returns:
        prev_sample (N, C, H, W) float32, pred_original_sample x0_t (N, C, H, W) float32 and
        log_prob (N,) float32: the Gaussian log-density of prev_sample, averaged over C*H*W
        (the paper's code averages rather than sums; it keeps the scale independent of size).
        prev_sample is returned in float32, exactly the tensor its log-prob scores: rounding it to
        a half-precision model dtype would move the log-prob of a stored transition (by up to
        4e-3 under bf16 at SD-Turbo's late steps, 40x the clip range) before any update.
    """
    if eta <= 0:
        raise ValueError("eta must be > 0 for a log-probability (eta 0 is deterministic)")
    alpha_t, alpha_prev = _alphas(params, timesteps, sample.shape[0])
    # checked on the CPU schedule values (sigma_t = 0 iff a_prev = 1 or a_prev = a_t), so the step
    # never waits on the GPU
    if bool(((alpha_prev >= 1) | (alpha_prev == alpha_t)).any()):
        raise ValueError(
            "a DDIM step with zero variance has no log-probability (final_alpha_cumprod is 1 at the "
            "last step); use last_step='clamp' (sample.last_step: clamp), as the SDPO paper does"
        )
    mean, std, x0 = ddim_transition(params, model_output, timesteps, sample, eta)
    prev = mean + std * step_noise(mean, generator, noise) if prev_sample is None else prev_sample.float()
    return prev, x0, gaussian_log_prob(prev, mean, std)


class DDIMSampler(Sampler):
    """DDIM (eta > 0) over the model's schedule; ``last_step`` as in ``ddim_step``.

    Options: ``eta`` in (0, 1]; ``last_step`` ``"clamp"`` (the SDPO paper: the last step goes to
    ``alphas_cumprod[0]``) or ``"final_alpha"`` (diffusers exactly); ``timestep_spacing``
    overrides the config's spacing when given.
    """

    def __init__(
        self,
        scheduler_config: dict[str, Any],
        num_steps: int,
        eta: float = 1.0,
        last_step: str = "clamp",
        timestep_spacing: str | None = None,
    ) -> None:
        super().__init__(scheduler_config, num_steps)
        if not 0 < eta <= 1:
            raise ValueError(f"DDIM eta must be in (0, 1] for a log-probability, got {eta}")
        if last_step not in LAST_STEPS:
            raise ValueError(f"DDIM last_step must be one of {LAST_STEPS}, got {last_step!r}")
        extra = {"timestep_spacing": timestep_spacing} if timestep_spacing else {}
        scheduler = DDIMScheduler.from_config(self.scheduler_config, **extra)
        scheduler.set_timesteps(num_steps)
        self.eta = eta
        self.params = DDIMParams.from_scheduler(scheduler, num_steps, last_step=last_step)
        self._timesteps = scheduler.timesteps.to("cpu", torch.long)

    @classmethod
    def options_from_config(cls, sample_cfg: Any, model_cfg: Any) -> dict[str, Any]:
        return {"eta": sample_cfg.eta, "last_step": sample_cfg.last_step,
                "timestep_spacing": model_cfg.timestep_spacing}

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
        t = self._timesteps[step_indices(step_index, sample.shape[0], self.num_steps)]
        prev, x0, log_prob = ddim_step(
            self.params, model_output, t, sample, self.eta, prev_sample=prev_sample, generator=generator, noise=noise
        )
        return StepOutput(prev, x0, log_prob)

    def transition(self, model_output: torch.Tensor, step_index: torch.Tensor, sample: torch.Tensor) -> Transition:
        t = self._timesteps[step_indices(step_index, sample.shape[0], self.num_steps)]
        return ddim_transition(self.params, model_output, t, sample, self.eta)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, step_index: torch.Tensor) -> torch.Tensor:
        """DDPM's forward process at the step's timestep t: sqrt(a_t) x0 + sqrt(1 - a_t) noise."""
        t = self._timesteps[step_indices(step_index, x0.shape[0], self.num_steps)]
        a_t = per_item(self.params.alphas_cumprod[t], x0)
        return a_t.sqrt() * x0.float() + (1 - a_t).sqrt() * noise.float()
