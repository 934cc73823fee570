"""``hpsv2``: Human Preference Score v2 (Wu et al. 2023), OpenCLIP ViT-H/14 fine-tuned on HPD v2.

score = cos(image_emb, text_emb), exactly what ``hpsv2.score`` returns (about 0.2-0.3 for typical
images, range [-1, 1]); the HPSv2 benchmark tables print the mean times 100.

The published checkpoints (``HPS_v2_compressed.pt``, ``HPS_v2.1_compressed.pt`` from the hub repo
``xswu/HPSv2``) are OpenCLIP pickles; convert one once to a transformers ``CLIPModel`` directory::

    python -m sdpo_core.rewards.convert hpsv2 HPS_v2.1_compressed.pt /models/hpsv2 \
        --tokenizer laion/CLIP-ViT-H-14-laion2B-s32B-b79K

Options: ``path`` (the converted directory), ``tokenizer_path`` (if the directory has no
tokenizer: any OpenAI-CLIP BPE tokenizer, e.g. laion/CLIP-ViT-H-14-laion2B-s32B-b79K), ``batch_size``.
"""

from __future__ import annotations

import torch

from sdpo_core.rewards.clip_common import CLIPPairScorer, build_clip_pair_scorer

HOW_TO_GET = (
    "Download HPS_v2.1_compressed.pt from the hub repo xswu/HPSv2 and run: python -m sdpo_core.rewards.convert "
    "hpsv2 HPS_v2.1_compressed.pt OUT_DIR --tokenizer laion/CLIP-ViT-H-14-laion2B-s32B-b79K (see docs/rewards.md)"
)


def build(
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    path: str | None = None,
    tokenizer_path: str | None = None,
    batch_size: int = 32,
) -> CLIPPairScorer:
    """Load a converted HPSv2 ``CLIPModel`` directory."""
    return build_clip_pair_scorer(
        "hpsv2",
        path,
        tokenizer_path,
        device,
        dtype,
        batch_size,
        use_logit_scale=False,
        how_to_get=HOW_TO_GET,
        tokenizer_hint="e.g. laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
    )
