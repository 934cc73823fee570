"""Dual-state trajectories: noisy latents x_t, predicted clean latents x0_t and log-probs.

SDPO (paper section 4.1) samples two trajectories per prompt from the same initial noise x_T;
both go through the UNet as one batch of 2B. Every step records x_t, x0_t and
log p(x_{t-1} | x_t) under the sampling policy (see ``scheduling.ddim_step``).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch

from sdpo_core.scheduling import DDIMParams, ddim_step

# unet_fn(latents (N,C,H,W), timestep (scalar long), embeds (N,L,D)) -> model output (N,C,H,W)
UnetFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class Trajectories:
    """N trajectories of T steps. Items [0:B] and [B:2B] are the pairs when sampled paired."""

    latents: torch.Tensor  # (N, T+1, C, H, W) float32: x_T ... x_0; step j goes latents[:, j] -> latents[:, j+1]
    x0: torch.Tensor  # (N, T, C, H, W) float32: predicted clean latent at each step
    log_probs: torch.Tensor  # (N, T) float32

    @property
    def num_steps(self) -> int:
        return self.log_probs.shape[1]


def unet_caller(model: torch.nn.Module, dtype: torch.dtype, autocast: Callable[[], AbstractContextManager]) -> UnetFn:
    """The denoiser call that sampling, training and evaluation share: inputs cast to the model's
    compute dtype, run under ``autocast()`` (accelerate's, or ``torch.autocast``)."""

    def fn(x: torch.Tensor, t: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        with autocast():
            return model(x.to(dtype), t, encoder_hidden_states=e.to(dtype)).sample

    return fn


def draw_noise(shape: tuple[int, ...], generator: torch.Generator | list[torch.Generator] | None) -> torch.Tensor:
    """(N, ...) float32 standard normal noise on the CPU. A list of N generators gives item i the
    noise of generator i alone (an evaluation sample then depends on its seed, not its batch)."""
    if isinstance(generator, list):
        if len(generator) != shape[0]:
            raise ValueError(f"{len(generator)} generators for {shape[0]} items")
        return torch.cat([torch.randn((1, *shape[1:]), generator=g) for g in generator])
    return torch.randn(shape, generator=generator)


@dataclass
class Policy:
    """How the model samples at T steps: the denoiser call, the DDIM constants and timesteps, eta and
    CFG. ``build_policy`` makes it for training, evaluation and ``sdpo generate`` alike, so what is
    evaluated is sampled exactly as what was trained."""

    unet_fn: UnetFn
    params: DDIMParams
    timesteps: torch.Tensor  # (T,) long, on the CPU
    eta: float
    guidance_scale: float = 1.0
    negative_embeds: torch.Tensor | None = None  # (1, L, D) empty-prompt embedding, CFG only

    def negatives(self, n: int) -> torch.Tensor | None:
        return None if self.negative_embeds is None else self.negative_embeds.expand(n, -1, -1)

    def sample(self, embeds: torch.Tensor, init_latents: torch.Tensor,
               generator: torch.Generator | list[torch.Generator] | None) -> Trajectories:
        """N trajectories from x_T ``init_latents`` (N, C, H, W) for ``embeds`` (N, L, D)."""
        return sample_trajectories(self.unet_fn, self.params, self.timesteps, embeds, init_latents, self.eta,
                                   generator, self.guidance_scale, self.negatives(embeds.shape[0]))


def build_policy(scheduler, unet_fn: UnetFn, num_steps: int, eta: float, last_step: str,
                 guidance_scale: float = 1.0, negative_embeds: torch.Tensor | None = None) -> Policy:
    """A Policy at ``num_steps`` from a diffusers DDIMScheduler (its ``set_timesteps`` is called)."""
    if num_steps < 1:
        raise ValueError(f"the number of denoising steps must be >= 1, got {num_steps}")
    scheduler.set_timesteps(num_steps, device="cpu")
    params = DDIMParams.from_scheduler(scheduler, num_steps, last_step)
    neg = negative_embeds if guidance_scale > 1 else None
    return Policy(unet_fn, params, scheduler.timesteps.clone().long(), eta, guidance_scale, neg)


def guided_output(
    unet_fn: UnetFn,
    latents: torch.Tensor,
    t: torch.Tensor,
    embeds: torch.Tensor,
    guidance_scale: float,
    negative_embeds: torch.Tensor | None,
) -> torch.Tensor:
    """UNet output with classifier-free guidance when ``guidance_scale > 1``.

    Shapes: latents (N,C,H,W), t scalar or (N,), embeds / negative_embeds (N,L,D).
    """
    if guidance_scale <= 1.0:
        return unet_fn(latents, t, embeds)
    if negative_embeds is None:
        raise ValueError("guidance_scale > 1 needs negative (empty-prompt) embeddings")
    t2 = torch.cat([t, t]) if t.ndim else t
    out = unet_fn(torch.cat([latents, latents]), t2, torch.cat([negative_embeds, embeds]))
    uncond, cond = out.chunk(2)
    return uncond + guidance_scale * (cond - uncond)


@torch.no_grad()
def sample_trajectories(
    unet_fn: UnetFn,
    params: DDIMParams,
    timesteps: torch.Tensor,
    embeds: torch.Tensor,
    init_latents: torch.Tensor,
    eta: float,
    generator: torch.Generator | list[torch.Generator] | None = None,
    guidance_scale: float = 1.0,
    negative_embeds: torch.Tensor | None = None,
) -> Trajectories:
    """Run the DDIM sampler and record the dual states.

    Args:
        timesteps: (T,) long, the scheduler's timesteps for T inference steps.
        embeds: (N, L, D) prompt embeddings; init_latents: (N, C, H, W) x_T.
        generator: one CPU generator for the batch, or one per item (see ``draw_noise``).
    Returns:
        Trajectories with latents (N,T+1,C,H,W), x0 (N,T,C,H,W), log_probs (N,T).
    """
    x = init_latents.float()
    latents, x0s, log_probs = [x], [], []
    for t in timesteps:
        out = guided_output(unet_fn, x, t, embeds, guidance_scale, negative_embeds)
        noise = draw_noise(tuple(x.shape), generator).to(x.device)
        x, x0, lp = ddim_step(params, out, t, x, eta, noise=noise)
        latents.append(x)
        x0s.append(x0)
        log_probs.append(lp)
    return Trajectories(
        latents=torch.stack(latents, dim=1),
        x0=torch.stack(x0s, dim=1),
        log_probs=torch.stack(log_probs, dim=1),
    )


@torch.no_grad()
def sample_pairs(
    unet_fn: UnetFn,
    params: DDIMParams,
    timesteps: torch.Tensor,
    embeds: torch.Tensor,
    init_latents: torch.Tensor,
    eta: float,
    generator: torch.Generator | list[torch.Generator] | None = None,
    guidance_scale: float = 1.0,
    negative_embeds: torch.Tensor | None = None,
    paired: bool = True,
) -> Trajectories:
    """Two trajectories per prompt, in one batch of 2B.

    Args:
        embeds: (B, L, D); init_latents: (B, C, H, W) when ``paired`` (the shared x_T), or
            (2B, C, H, W) when not (DDPO: independent trajectories).
    Returns:
        Trajectories of N = 2B: items [0:B] are trajectory 1 of each prompt, [B:2B] trajectory 2.
    """
    x_t = torch.cat([init_latents, init_latents]) if paired else init_latents
    if x_t.shape[0] != 2 * embeds.shape[0]:
        raise ValueError(f"init_latents {tuple(init_latents.shape)} do not fit {embeds.shape[0]} prompts")
    neg = torch.cat([negative_embeds, negative_embeds]) if negative_embeds is not None else None
    return sample_trajectories(
        unet_fn, params, timesteps, torch.cat([embeds, embeds]), x_t, eta, generator, guidance_scale, neg
    )
