"""Dual-state trajectories: noisy latents x_t, predicted clean latents x0_t and log-probs.

A method samples k trajectories per prompt (``Policy.sample_groups``), from one shared initial
noise x_T (SDPO's pairs, paper section 4.1) or from k independent ones, in one batch of kB. Every step records x_t, x0_t and
log p(x_{t-1} | x_t) under the sampling policy: a family's denoiser call and a sampler's
stochastic step (``samplers/``), the same for sampling, training and evaluation (``Policy``).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch

from sdpo_core.families.family import Conditioning
from sdpo_core.samplers import SAMPLERS, Sampler, build_sampler, sampler_name_for

# denoise_fn(latents (N,C,H,W), timesteps (scalar or (N,)), cond (N rows)) -> native output (N,C,H,W)
DenoiseFn = Callable[[torch.Tensor, torch.Tensor, Conditioning], torch.Tensor]


@dataclass
class Trajectories:
    """N trajectories of T steps. From ``sample_groups``: items [jB:(j+1)B] are trajectory j of
    each of the B prompts."""

    latents: torch.Tensor  # (N, T+1, C, H, W) float32: x_T ... x_0; step j goes latents[:, j] -> latents[:, j+1]
    x0: torch.Tensor  # (N, T, C, H, W) float32: predicted clean latent at each step
    log_probs: torch.Tensor  # (N, T) float32

    @property
    def num_steps(self) -> int:
        return self.log_probs.shape[1]


def denoiser_caller(family: Any, model: torch.nn.Module, dtype: torch.dtype,
                    autocast: Callable[[], AbstractContextManager]) -> DenoiseFn:
    """The denoiser call that sampling, training and evaluation share: the family's ``denoise`` on
    ``model`` with latents and conditioning cast to the compute dtype, under ``autocast()``."""

    def fn(x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        with autocast():
            return family.denoise(model, x.to(dtype), t, cond.to(dtype=dtype))

    return fn


def draw_noise(shape: tuple[int, ...], generator: torch.Generator | list[torch.Generator] | None) -> torch.Tensor:
    """(N, ...) float32 standard normal noise on the CPU. A list of N generators gives item i the
    noise of generator i alone (an evaluation sample then depends on its seed, not its batch)."""
    if isinstance(generator, list):
        if len(generator) != shape[0]:
            raise ValueError(f"{len(generator)} generators for {shape[0]} items")
        return torch.cat([torch.randn((1, *shape[1:]), generator=g) for g in generator])
    return torch.randn(shape, generator=generator)


def guided_output(denoise: DenoiseFn, latents: torch.Tensor, t: torch.Tensor, cond: Conditioning,
                  guidance_scale: float, negative: Conditioning | None) -> torch.Tensor:
    """Denoiser output with classifier-free guidance when ``guidance_scale > 1``.

    Shapes: latents (N,C,H,W), t scalar or (N,), cond / negative: N rows.
    """
    if guidance_scale <= 1.0:
        return denoise(latents, t, cond)
    if negative is None:
        raise ValueError("guidance_scale > 1 needs negative (empty-prompt) conditioning")
    t2 = torch.cat([t, t]) if t.ndim else t
    out = denoise(torch.cat([latents, latents]), t2, Conditioning.cat([negative, cond]))
    uncond, c = out.chunk(2)
    return uncond + guidance_scale * (c - uncond)


@dataclass
class Policy:
    """How the model samples: the denoiser call, the sampler (timesteps and the stochastic step with
    its log-prob) and CFG. Built by ``build_policy`` for training, evaluation and ``sdpo generate``
    alike, so what is evaluated is sampled exactly as what was trained."""

    denoise: DenoiseFn
    sampler: Sampler
    guidance_scale: float = 1.0
    negative: Conditioning | None = None  # 1 row: the empty prompt, CFG only

    @property
    def timesteps(self) -> torch.Tensor:
        return self.sampler.timesteps

    def negatives(self, n: int) -> Conditioning | None:
        return None if self.negative is None else self.negative.expand(n)

    def output(self, latents: torch.Tensor, step_index: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The (guided) denoiser output of items at step indices ``step_index`` (N,) or a scalar."""
        t = self.sampler.timesteps[step_index]
        return guided_output(self.denoise, latents, t, cond, self.guidance_scale, self.negatives(len(cond)))

    @torch.no_grad()
    def sample(self, cond: Conditioning, init_latents: torch.Tensor,
               generator: torch.Generator | list[torch.Generator] | None) -> Trajectories:
        """N trajectories from x_T ``init_latents`` (N, C, H, W) for ``cond`` (N rows).

        generator: one CPU generator for the batch, or one per item (see ``draw_noise``).
        """
        x = init_latents.float()
        latents, x0s, log_probs = [x], [], []
        for i in range(self.sampler.num_steps):
            out = self.output(x, torch.tensor(i), cond)
            noise = draw_noise(tuple(x.shape), generator).to(x.device)
            x, x0, lp = self.sampler.step(out, torch.tensor(i), x, noise=noise)
            latents.append(x)
            x0s.append(x0)
            log_probs.append(lp)
        return Trajectories(torch.stack(latents, dim=1), torch.stack(x0s, dim=1), torch.stack(log_probs, dim=1))

    @torch.no_grad()
    def sample_groups(self, cond: Conditioning, init_latents: torch.Tensor, generator: torch.Generator | None,
                      k: int = 2, shared_noise: bool = True) -> Trajectories:
        """k trajectories per prompt in one batch of kB: cond has B rows; init_latents (B, C, H, W)
        when ``shared_noise`` (the group's common x_T), or (kB, C, H, W) when not (independent
        trajectories). Items [jB:(j+1)B] are trajectory j of each prompt."""
        x_t = torch.cat([init_latents] * k) if shared_noise else init_latents
        if x_t.shape[0] != k * len(cond):
            raise ValueError(f"init_latents {tuple(init_latents.shape)} do not fit {k} x {len(cond)} prompts")
        return self.sample(cond.repeat(k), x_t, generator)


def sampler_options(sample_cfg: Any, model_cfg: Any, family: Any, latent_shape: tuple[int, int, int],
                    name: str) -> dict[str, Any]:
    """The sampler's options from the config: the sampler class's own mapping of ``sample.*``, the
    family's (a flow family's sigma schedule and shift), then ``sample.sampler_options``."""
    opts = dict(SAMPLERS[name].options_from_config(sample_cfg, model_cfg))
    opts.update(family.sampler_options(latent_shape))
    opts.update(sample_cfg.sampler_options)
    return opts


def build_policy(family: Any, denoise: DenoiseFn, num_steps: int, sample_cfg: Any, model_cfg: Any,
                 latent_shape: tuple[int, int, int]) -> Policy:
    """A Policy at ``num_steps`` for ``family`` (the sampler from its scheduler config)."""
    if num_steps < 1:
        raise ValueError(f"the number of denoising steps must be >= 1, got {num_steps}")
    config = family.scheduler_config
    name = sample_cfg.sampler or sampler_name_for(config)
    opts = sampler_options(sample_cfg, model_cfg, family, latent_shape, name)
    sampler = build_sampler(config, num_steps, name, **opts)
    neg = family.encode([""]) if sample_cfg.guidance_scale > 1 else None
    return Policy(denoise, sampler, sample_cfg.guidance_scale, neg)
