"""Images from a model, sampled exactly as training samples them.

Evaluation, ``sdpo generate`` and the benchmarks all go through :func:`generate_trajectories`:
the same sampling policy as training (``sampling.build_policy``: the family's denoiser call, the
sampler with its timesteps and options, CFG), on the model's device and compute dtype, with one
CPU generator per sample so that a sample depends on its seed only (not on its batch or the device). Images are decoded from the
last step's predicted clean latent x0, the state the final reward is computed on in training
(with ``last_step: final_alpha`` it is exactly the image diffusers' pipeline returns).

Usage::

    family = load_family("runs/digits-tiny/base")
    images = generate(family, ["a seven"], [0], num_steps=1, cfg=cfg)   # (1, 3, H, W) in [0, 1]
"""

from __future__ import annotations

import contextlib

import torch

from sdpo_core.config import Config, ModelConfig, SampleConfig
from sdpo_core.families.family import Family
from sdpo_core.families.loading import DTYPES
from sdpo_core.rundir import ranks
from sdpo_core.sampling import Policy, Trajectories, build_policy, denoiser_caller, draw_noise


def compute_dtype(mixed_precision: str) -> torch.dtype:
    """The denoiser's compute dtype for ``model.mixed_precision`` (``no`` -> float32)."""
    return DTYPES[mixed_precision]


def default_device() -> torch.device:
    """Where training runs by default (accelerate's choice): a GPU if there is one; under a launcher,
    this process's GPU (its rank on this machine, as accelerate assigns them)."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", ranks.local_rank() % torch.cuda.device_count()) if ranks.launched() else torch.device("cuda")


def policy_for(family: Family, num_steps: int, sample_cfg: SampleConfig, model_cfg: ModelConfig,
               dtype: torch.dtype = torch.float32) -> Policy:
    """The training sampler for ``family``'s denoiser at ``num_steps``, computing in ``dtype``."""
    device = family.denoiser.device
    if dtype == torch.float32:
        autocast = contextlib.nullcontext
    else:
        def autocast():
            return torch.autocast(device.type, dtype=dtype)
    denoise = denoiser_caller(family, family.denoiser, dtype, autocast)
    return build_policy(family, denoise, num_steps, sample_cfg, model_cfg, family.latent_shape(sample_cfg.resolution))


@torch.no_grad()
def generate_trajectories(family: Family, policy: Policy, prompts: list[str], seeds: list[int],
                          resolution: int | None) -> Trajectories:
    """len(prompts) trajectories; sample i starts from (and draws its step noise from) seed i."""
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    init = draw_noise((len(seeds), *family.latent_shape(resolution)), gens).to(family.denoiser.device)
    return policy.sample(family.encode(prompts), init, gens)


def generate(family: Family, prompts: list[str], seeds: list[int], num_steps: int, cfg: Config,
             dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(N, 3, H, W) float32 images in [0, 1], sampled with ``cfg.sample``'s policy."""
    policy = policy_for(family, num_steps, cfg.sample, cfg.model, dtype)
    traj = generate_trajectories(family, policy, prompts, seeds, cfg.sample.resolution)
    return family.decode(traj.x0[:, -1])
