"""Images from a model, sampled exactly as training samples them.

Evaluation, ``sdpo generate`` and the benchmarks all go through :func:`generate_trajectories`:
the same DDIM policy as training (``sampling.build_policy``: timesteps, ``sample.last_step``,
eta, CFG), on the model's device and compute dtype, with one CPU generator per sample so that a
sample depends on its seed only (not on its batch or the device). Images are decoded from the
last step's predicted clean latent x0, the state the final reward is computed on in training
(with ``last_step: final_alpha`` it is exactly the image diffusers' pipeline returns).

Usage::

    pipe = models.load_pipeline("runs/digits-tiny/base")
    images = generate(pipe, ["a seven"], [0], num_steps=1, cfg=cfg)   # (1, 3, H, W) in [0, 1]
"""

from __future__ import annotations

import contextlib

import torch

from sdpo_core.config import Config
from sdpo_core.models import DTYPES, decode_latents, encode_prompts, latent_shape
from sdpo_core.sampling import Policy, Trajectories, build_policy, draw_noise, unet_caller


def compute_dtype(mixed_precision: str) -> torch.dtype:
    """The denoiser's compute dtype for ``model.mixed_precision`` (``no`` -> float32)."""
    return DTYPES[mixed_precision]


def default_device() -> torch.device:
    """Where training runs by default (accelerate's choice on one process): a GPU if there is one."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def policy_for(pipe, num_steps: int, eta: float, last_step: str, guidance_scale: float,
               dtype: torch.dtype = torch.float32) -> Policy:
    """The training sampler for ``pipe``'s UNet at ``num_steps``, computing in ``dtype``."""
    device = pipe.unet.device
    if dtype == torch.float32:
        autocast = contextlib.nullcontext
    else:
        def autocast():
            return torch.autocast(device.type, dtype=dtype)
    neg = encode_prompts(pipe, [""]) if guidance_scale > 1 else None
    return build_policy(pipe.scheduler, unet_caller(pipe.unet, dtype, autocast), num_steps, eta, last_step,
                        guidance_scale, neg)


@torch.no_grad()
def generate_trajectories(pipe, policy: Policy, prompts: list[str], seeds: list[int],
                          resolution: int | None) -> Trajectories:
    """len(prompts) trajectories; sample i starts from (and draws its step noise from) seed i."""
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    init = draw_noise((len(seeds), *latent_shape(pipe, resolution)), gens).to(pipe.unet.device)
    return policy.sample(encode_prompts(pipe, prompts), init, gens)


def generate(pipe, prompts: list[str], seeds: list[int], num_steps: int, cfg: Config,
             dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(N, 3, H, W) float32 images in [0, 1], sampled with ``cfg.sample``'s policy."""
    s = cfg.sample
    policy = policy_for(pipe, num_steps, s.eta, s.last_step, s.guidance_scale, dtype)
    traj = generate_trajectories(pipe, policy, prompts, seeds, s.resolution)
    return decode_latents(pipe, traj.x0[:, -1])
