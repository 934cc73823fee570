"""Built-in rewards: the JPEG ones (no weights) here, the model-based ones registered lazily."""

from __future__ import annotations

import importlib
import io

import numpy as np
import torch
from PIL import Image

from sdpo_core.rewards.registry import Factory, call_factory, register_reward


def to_uint8_hwc(images: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) in [0, 1] -> (N, H, W, 3) uint8."""
    return (
        (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    )


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


def _lazy(module: str) -> Factory:
    """A factory that imports ``sdpo_core.rewards.<module>`` only when the reward is built, so that
    ``import sdpo_core.rewards`` stays light (no transformers, no HTTP client)."""

    def factory(device=None, dtype=None, model_dir=None, **options):
        build = importlib.import_module(f"sdpo_core.rewards.{module}").build
        return call_factory(module, build, device, dtype, options, model_dir)

    return factory


for _name, _what, _range in (
    (
        "aesthetic",
        "LAION aesthetic predictor: MLP head on L2-normalised CLIP ViT-L/14 image embeddings",
        "about [1, 10] (typically 4-7)",
    ),
    (
        "pickscore",
        "PickScore: logit_scale.exp() * cosine of CLIP-H image and prompt embeddings",
        "[-100, 100] (typically 18-24)",
    ),
    (
        "hpsv2",
        "HPSv2: cosine of OpenCLIP ViT-H/14 image and prompt embeddings (fine-tuned on human preferences)",
        "[-1, 1] (typically 0.2-0.3)",
    ),
    (
        "imagereward",
        "ImageReward: BLIP image-prompt features into an MLP head, z-scored as published",
        "about [-2.5, 2.5]",
    ),
    (
        "combine",
        "weighted sum of other rewards (options.components), optionally z-scored per batch",
        "weighted sum of the components' ranges",
    ),
    (
        "remote",
        "a reward served over HTTP by `sdpo reward-server` (options.url)",
        "the served reward's range",
    ),
):
    register_reward(_name, _what, _range)(_lazy(_name))
