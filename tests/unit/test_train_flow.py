"""digits-flow-tiny's latent normalisation (tiny/train_flow.py)."""

from __future__ import annotations

import torch

from sdpo_core.tiny.flow import tiny_vae
from sdpo_core.tiny.train_flow import _set_shift_and_scale


def test_shift_and_scale_make_latents_zero_mean_unit_std():
    # catches: the shift subtracted after scaling, or scale = std instead of 1 / std
    gen = torch.Generator().manual_seed(0)
    mean = 0.7 + 2.0 * torch.randn(500, 4, 8, 8, generator=gen)
    std = torch.full_like(mean, 0.5)
    vae = tiny_vae(latent_channels=4)
    shift, scale = _set_shift_and_scale(vae, mean, std)
    assert (vae.config.shift_factor, vae.config.scaling_factor) == (shift, scale)
    z = mean + std * torch.randn(mean.shape, generator=gen)
    x0 = (z - vae.config.shift_factor) * vae.config.scaling_factor
    assert abs(x0.mean().item()) < 0.02 and abs(x0.std().item() - 1) < 0.02
