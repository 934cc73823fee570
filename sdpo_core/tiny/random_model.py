"""A randomly initialised tiny ``StableDiffusionPipeline``, built in code: the same classes SD-Turbo uses.

32x32 RGB images, an AutoencoderKL with scale factor 4 (8x8x4 latents), a ~1.1M-parameter
UNet2DConditionModel with cross-attention, a 2-layer CLIP text encoder and a DDIM scheduler
with SD's scaled-linear betas and trailing spacing (as SD-Turbo samples).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from sdpo_core.tiny.tokenizer import build_tokenizer

# words the random tiny tokenizer knows whole (others fall back to characters)
RANDOM_TINY_WORDS = (
    "a an the of handwritten digit number drawing zero one two three four five six seven eight nine "
    "cat dog horse bird fish"
).split()


@dataclass
class TinySizes:
    image_size: int = 32
    unet_channels: tuple[int, ...] = (32, 64)
    vae_channels: tuple[int, ...] = (16, 32, 32)
    text_hidden: int = 32
    text_layers: int = 2
    max_length: int = 32
    prediction_type: str = "epsilon"
    words: list[str] = field(default_factory=list)


# SD-Turbo's scheduler/scheduler_config.json as sdpo loads it (DDIM, trailing spacing); the tiny
# pipelines and bench/gpu.py's SD-Turbo-shaped model share it
SD_TURBO_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    prediction_type="epsilon",
    timestep_spacing="trailing",
)


def tiny_scheduler(prediction_type: str = "epsilon") -> DDIMScheduler:
    return DDIMScheduler(**{**SD_TURBO_SCHEDULER, "prediction_type": prediction_type})


def build_tiny_pipeline(sizes: TinySizes | None = None, seed: int = 0) -> StableDiffusionPipeline:
    """A randomly initialised tiny pipeline (deterministic for ``seed``)."""
    sizes = sizes or TinySizes()
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = build_tokenizer(sizes.words, tmp, max_length=sizes.max_length)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=sizes.text_hidden,
            intermediate_size=sizes.text_hidden * 2,
            num_hidden_layers=sizes.text_layers,
            num_attention_heads=4,
            max_position_embeddings=sizes.max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    n_vae = len(sizes.vae_channels)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n_vae,
        up_block_types=("UpDecoderBlock2D",) * n_vae,
        block_out_channels=sizes.vae_channels,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=sizes.image_size,
    )
    latent_size = sizes.image_size // 2 ** (n_vae - 1)
    n_unet = len(sizes.unet_channels)
    unet = UNet2DConditionModel(
        sample_size=latent_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=sizes.unet_channels,
        layers_per_block=1,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n_unet - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (n_unet - 1) + ("UpBlock2D",),
        cross_attention_dim=sizes.text_hidden,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=tiny_scheduler(sizes.prediction_type),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
