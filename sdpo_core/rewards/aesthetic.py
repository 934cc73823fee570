"""``aesthetic``: the LAION aesthetic predictor (improved-aesthetic-predictor, "sac+logos+ava1").

score = MLP(e / ||e||), e = CLIP ViT-L/14 image embedding (the 768-d projected one); the MLP is
:class:`~sdpo_core.rewards.clip_common.PreferenceHead`, trained to regress 1-10 ratings, so
scores sit around 4-7 for typical images. Same definition as DDPO's aesthetic reward.

Weights, one directory::

    OUT_DIR/aesthetic_head.safetensors   # the MLP head (convert the published .pth, below)
    OUT_DIR/clip/                        # CLIP ViT-L/14 (openai/clip-vit-large-patch14), optional

    python -m sdpo_core.rewards.convert aesthetic sac+logos+ava1-l14-linearMSE.pth OUT_DIR \
        --clip openai/clip-vit-large-patch14

Options: ``path`` (that directory, the head file, or a hub repo holding both), ``clip_path``
(CLIP elsewhere: a directory or hub id; default ``path/clip`` if present, else ``path``),
``batch_size``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from sdpo_core.rewards import RewardError
from sdpo_core.rewards.clip_common import (
    check_batch_size,
    check_source,
    clip_preprocess,
    head_from_state_dict,
    load_pretrained,
    resolve_file,
    score_in_batches,
)

HEAD_FILE = "aesthetic_head.safetensors"
HOW_TO_GET = (
    "Download sac+logos+ava1-l14-linearMSE.pth from github.com/christophschuhmann/improved-aesthetic-predictor "
    "and run: python -m sdpo_core.rewards.convert aesthetic sac+logos+ava1-l14-linearMSE.pth OUT_DIR "
    "--clip openai/clip-vit-large-patch14 (see docs/rewards.md)"
)


class AestheticScorer:
    """CLIP image embedding -> L2 normalise -> MLP head. Call with (N, 3, H, W) in [0, 1]."""

    def __init__(
        self,
        clip: torch.nn.Module,
        head: torch.nn.Module,
        device: torch.device,
        dtype: torch.dtype,
        batch_size: int,
    ) -> None:
        self.clip, self.head = clip, head
        self.device, self.dtype, self.batch_size = device, dtype, batch_size

    def _score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """(n, 3, H, W) -> (n,)."""
        pixels = clip_preprocess(images.to(self.device)).to(self.dtype)
        emb = self.clip(pixel_values=pixels).image_embeds.float()
        emb = emb / emb.norm(dim=-1, keepdim=True)
        return self.head(emb)

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """(N, 3, H, W) in [0, 1] -> (N,) float32; prompts are ignored (aesthetics only)."""
        return score_in_batches(self._score, images, prompts, self.batch_size)


def _clip_location(path: str, clip_path: str | None) -> tuple[str, str | None]:
    if clip_path:
        return check_source("aesthetic", clip_path, HOW_TO_GET), None
    local = Path(path).expanduser()
    if local.is_file():
        raise RewardError(
            f"reward 'aesthetic': path '{path}' is the head file alone; set reward.options.clip_path to CLIP "
            "ViT-L/14 (e.g. openai/clip-vit-large-patch14)"
        )
    return (path, "clip") if (local / "clip").is_dir() else (path, None)


def load_clip_vision(source: str, subfolder: str | None, dtype: torch.dtype) -> Any:
    """The image tower + projection of a CLIP checkpoint (full ``CLIPModel`` or vision-only).

    A full checkpoint keeps the projection size at its top level, where the vision sub-config
    does not look (it would default to 512 instead of ViT-L/14's 768), so it is passed on here.
    """
    from transformers import AutoConfig, CLIPVisionModelWithProjection
    from transformers.utils import logging as hf_logging

    kwargs = {"subfolder": subfolder} if subfolder else {}
    config = load_pretrained("aesthetic", AutoConfig, source, HOW_TO_GET, **kwargs)
    if hasattr(config, "vision_config"):
        vision = config.vision_config
        vision.projection_dim = config.projection_dim
        config = vision
    # A full checkpoint's text tower is an expected leftover that transformers reports as a large
    # "unexpected keys" table; quiet it. Missing weights are still an error (load_pretrained).
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return load_pretrained(
            "aesthetic",
            CLIPVisionModelWithProjection,
            source,
            HOW_TO_GET,
            config=config,
            dtype=dtype,
            **kwargs,
        )
    finally:
        hf_logging.set_verbosity(verbosity)


def build(
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    path: str | None = None,
    clip_path: str | None = None,
    batch_size: int = 32,
) -> AestheticScorer:
    """Load CLIP ViT-L/14 and the aesthetic head from ``path`` (see the module docstring)."""

    batch_size = check_batch_size("aesthetic", batch_size)
    path = check_source("aesthetic", path, HOW_TO_GET)
    head_file = resolve_file("aesthetic", path, HEAD_FILE, HOW_TO_GET)
    head = head_from_state_dict("aesthetic", load_file(str(head_file)), str(head_file))
    source, subfolder = _clip_location(path, clip_path)
    clip = load_clip_vision(source, subfolder, dtype)
    device = torch.device(device)
    return AestheticScorer(clip.to(device).eval(), head.to(device), device, dtype, batch_size)
