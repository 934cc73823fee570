"""``pickscore``: PickScore (Kirstain et al. 2023), CLIP ViT-H/14 fine-tuned on Pick-a-Pic preferences.

score = logit_scale.exp() * cos(image_emb, text_emb), as in the authors' inference example
(logit_scale.exp() is 100 for the published weights, so scores sit around 18-24, range [-100, 100]).

Weights are a transformers ``CLIPModel`` already (safetensors on the hub): ``path`` =
``yuvalkirstain/PickScore_v1`` or a local copy of it. The authors pair it with the processor of
``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``; when ``path`` has no tokenizer files, set
``tokenizer_path`` to that hub id or a local copy. Options: ``path``, ``tokenizer_path``, ``batch_size``.
"""

from __future__ import annotations

import torch

from sdpo_core.rewards.clip_common import CLIPPairScorer, build_clip_pair_scorer

HOW_TO_GET = (
    "Get them with: hf download yuvalkirstain/PickScore_v1 --local-dir /models/pickscore "
    "(and laion/CLIP-ViT-H-14-laion2B-s32B-b79K for the tokenizer; see docs/rewards.md)"
)


def build(
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    path: str | None = None,
    tokenizer_path: str | None = None,
    batch_size: int = 32,
) -> CLIPPairScorer:
    """Load PickScore from ``path`` (directory or hub id)."""
    return build_clip_pair_scorer(
        "pickscore",
        path,
        tokenizer_path,
        device,
        dtype,
        batch_size,
        use_logit_scale=True,
        how_to_get=HOW_TO_GET,
        tokenizer_hint="e.g. laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
    )
