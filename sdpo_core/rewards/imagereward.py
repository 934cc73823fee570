"""``imagereward``: ImageReward (Xu et al. 2023), a BLIP model with an MLP head trained on human rankings.

score = (MLP(h_cls) - 0.16717362830052426) / 1.0333394966054072, where h_cls is the [CLS] output
of BLIP's BERT text encoder reading the prompt (padded to 35 tokens) while cross-attending to the
ViT-L/16 image tokens; the MLP is :class:`~sdpo_core.rewards.clip_common.PreferenceHead` on 768
features and the mean/std are the published constants, so scores are z-scores (about -2.5 to 2.5).

Built on transformers' BLIP classes: ``BlipVisionModel`` (ViT) and ``BlipTextModel`` (BERT with
cross-attention), with the same parameter names as ``BlipForImageTextRetrieval``. The published
``ImageReward.pt`` (hub repo ``THUDM/ImageReward``) is a pickle; convert it once::

    python -m sdpo_core.rewards.convert imagereward ImageReward.pt /models/imagereward --tokenizer bert-base-uncased

Options: ``path`` (the converted directory: config.json + model.safetensors), ``tokenizer_path``
(if the directory has no tokenizer: bert-base-uncased), ``batch_size``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from sdpo_core.rewards import RewardError
from sdpo_core.rewards.clip_common import (
    PreferenceHead,
    check_batch_size,
    check_source,
    clip_preprocess,
    load_pretrained,
    load_tokenizer,
    resolve_file,
    score_in_batches,
)

MEAN = 0.16717362830052426  # published normalisation of the raw head output
STD = 1.0333394966054072
MAX_LENGTH = 35  # ImageReward pads/truncates prompts to 35 tokens
WEIGHTS_FILE = "model.safetensors"
HOW_TO_GET = (
    "Download ImageReward.pt from the hub repo THUDM/ImageReward and run: python -m sdpo_core.rewards.convert "
    "imagereward ImageReward.pt OUT_DIR --tokenizer bert-base-uncased (see docs/rewards.md)"
)


class ImageRewardModel(nn.Module):
    """BLIP ViT + BERT-with-cross-attention + MLP head; parameters ``vision_model.*``,
    ``text_encoder.*``, ``mlp.layers.*``."""

    def __init__(self, config: Any) -> None:
        from transformers import BlipTextModel, BlipVisionModel

        super().__init__()
        if not config.text_config.is_decoder:
            raise RewardError(
                "ImageReward's text encoder needs cross-attention layers (text_config.is_decoder=true)"
            )
        self.config = config
        self.vision_model: nn.Module = BlipVisionModel(config.vision_config)
        self.text_encoder: nn.Module = BlipTextModel(config.text_config, add_pooling_layer=False)
        self.mlp = PreferenceHead(config.text_config.hidden_size)

    def forward(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """pixel_values: (N, 3, S, S) normalised; input_ids, attention_mask: (N, L). Returns (N,) float32."""
        image_embeds = self.vision_model(pixel_values=pixel_values).last_hidden_state  # (N, 1 + P, Dv)
        image_mask = torch.ones(image_embeds.shape[:2], dtype=torch.long, device=image_embeds.device)
        # is_decoder=False: bidirectional self-attention over the prompt, as BLIP's "multimodal" mode.
        text = self.text_encoder(
            input_ids=input_ids,
            attention_mask=attention_mask,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_mask,
            is_decoder=False,
        )
        cls = text.last_hidden_state[:, 0].float()  # (N, Dt)
        return (self.mlp(cls) - MEAN) / STD

    def save(self, out_dir: str | Path) -> Path:
        """Write ``config.json`` and ``model.safetensors`` into ``out_dir``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.config.save_pretrained(str(out))
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(out / WEIGHTS_FILE))
        return out


class ImageRewardScorer:
    """Call with (N, 3, H, W) in [0, 1] and N prompts -> (N,) float32."""

    def __init__(
        self,
        model: ImageRewardModel,
        tokenizer: Any,
        device: torch.device,
        dtype: torch.dtype,
        batch_size: int,
    ) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.device, self.dtype, self.batch_size = device, dtype, batch_size
        self.image_size = model.config.vision_config.image_size

    def _score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        pixels = clip_preprocess(images.to(self.device), self.image_size).to(self.dtype)
        tokens = self.tokenizer(
            prompts, padding="max_length", truncation=True, max_length=MAX_LENGTH, return_tensors="pt"
        ).to(self.device)
        return self.model(pixels, tokens["input_ids"], tokens["attention_mask"])

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return score_in_batches(self._score, images, prompts, self.batch_size)


def load_model(path: str, dtype: torch.dtype = torch.float32) -> ImageRewardModel:
    """Load a converted directory (local or hub id); the MLP head stays float32 (five cheap matmuls
    whose output is the reward: no reason to round it)."""
    from transformers import BlipConfig

    config = load_pretrained("imagereward", BlipConfig, path, HOW_TO_GET)
    weights = resolve_file("imagereward", path, WEIGHTS_FILE, HOW_TO_GET)
    model = ImageRewardModel(config)
    try:
        model.load_state_dict(load_file(str(weights)), strict=True)
    except RuntimeError as exc:
        raise RewardError(f"reward 'imagereward': '{weights}' does not fit its config.json: {exc}") from exc
    model.vision_model.to(dtype)
    model.text_encoder.to(dtype)
    return model.eval()


def build(
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    path: str | None = None,
    tokenizer_path: str | None = None,
    batch_size: int = 32,
) -> ImageRewardScorer:
    """Load a converted ImageReward directory (see the module docstring)."""
    batch_size = check_batch_size("imagereward", batch_size)
    path = check_source("imagereward", path, HOW_TO_GET)
    model = load_model(path, dtype)
    tokenizer = load_tokenizer("imagereward", path, tokenizer_path, "e.g. bert-base-uncased")
    device = torch.device(device)
    return ImageRewardScorer(model.to(device), tokenizer, device, dtype, batch_size)
