"""Rewards that need no model weights, and placeholders for the model-based ones."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from sdpo_core.rewards import RewardError, register_reward


def to_uint8_hwc(images: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) in [0, 1] -> (N, H, W, 3) uint8."""
    return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def jpeg_size_kb(images: torch.Tensor, quality: int = 95) -> torch.Tensor:
    """(N, 3, H, W) in [0, 1] -> (N,) size of each image as a JPEG at ``quality``, in kB."""
    sizes = []
    for arr in to_uint8_hwc(images):
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
        sizes.append(buf.tell() / 1000.0)
    return torch.tensor(sizes, dtype=torch.float32)


@register_reward(
    "jpeg_compressibility",
    "minus the JPEG size (quality 95) of the image in kB (DDPO's definition): simpler images score higher",
    "(-inf, 0]",
)
def jpeg_compressibility(device=None, dtype=None, quality: int = 95):
    return lambda images, prompts: -jpeg_size_kb(images, quality)


@register_reward(
    "jpeg_incompressibility",
    "the JPEG size (quality 95) of the image in kB (DDPO's definition): detailed images score higher",
    "[0, inf)",
)
def jpeg_incompressibility(device=None, dtype=None, quality: int = 95):
    return lambda images, prompts: jpeg_size_kb(images, quality)


def _needs_weights(name: str):
    def factory(device=None, dtype=None, **options):
        raise RewardError(
            f"reward '{name}' needs its published model weights, and its scorer is not part of this "
            "version of sdpo yet; choose another reward (e.g. --set reward.name=jpeg_compressibility) "
            "or a module:function of your own"
        )

    return factory


for _name, _what in {
    "aesthetic": "LAION aesthetic predictor on CLIP ViT-L/14 image embeddings",
    "imagereward": "ImageReward (BLIP-based human preference model)",
    "hpsv2": "HPSv2 (OpenCLIP ViT-H/14 fine-tuned on human preferences)",
    "pickscore": "PickScore (CLIP-H fine-tuned on Pick-a-Pic preferences)",
}.items():
    register_reward(_name, _what, "model-defined")(_needs_weights(_name))
