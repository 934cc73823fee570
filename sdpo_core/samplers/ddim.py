"""DDIM with log-probs: ``scheduling.ddim_step`` behind the ``Sampler`` interface.

The schedule (timesteps, alphas) comes from a ``diffusers.DDIMScheduler`` rebuilt from the
model's own scheduler config (DDIM, Euler, Euler ancestral, PNDM or DPM-Solver configs all carry
the same betas, prediction type and spacing), so the step math stays in ``scheduling.py``.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import DDIMScheduler

from sdpo_core.samplers.base import Sampler, StepOutput
from sdpo_core.scheduling import DDIMParams, ddim_step

LAST_STEPS = ("clamp", "final_alpha")


def step_indices(step_index: torch.Tensor | int, n: int, num_steps: int) -> torch.Tensor:
    """Step indices (N,) or a scalar -> (N,) long on the CPU, each checked to be in [0, num_steps)."""
    index = torch.as_tensor(step_index, device="cpu").long().reshape(-1).expand(n)
    if bool(((index < 0) | (index >= num_steps)).any()):
        raise IndexError(f"step_index {index.tolist()} out of range for {num_steps} steps")
    return index


class DDIMSampler(Sampler):
    """DDIM (eta > 0) over the model's schedule; ``last_step`` as in ``scheduling.ddim_step``.

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
