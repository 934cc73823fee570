"""Tiny pipelines of the other UNet families, built in code: SDXL (the SDXL-Turbo layout) and LCM.

Both reuse the tiny SD pipeline's tokenizer, text encoder and VAE (``tiny/random_model.py``) and are
written with ``save_pretrained`` so they load through ``from_pretrained`` like the real models.
Sizes: see /work/shared/STACK.md "Tiny pipelines of other few-step families".
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from diffusers import (
    EulerAncestralDiscreteScheduler,
    LatentConsistencyModelPipeline,
    LCMScheduler,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModelWithProjection

from sdpo_core.tiny.random_model import RANDOM_TINY_WORDS, TinySizes, build_tiny_pipeline

BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
LCM_TIME_COND_DIM = 32


def build_tiny_lcm_pipeline(words: list[str], seed: int = 0) -> LatentConsistencyModelPipeline:
    """The tiny SD pipeline with an LCM UNet (``time_cond_proj_dim``) and LCM-Dreamshaper's LCMScheduler."""
    sd = build_tiny_pipeline(TinySizes(words=words), seed=seed)
    torch.manual_seed(seed + 1)
    unet = UNet2DConditionModel.from_config(sd.unet.config, time_cond_proj_dim=LCM_TIME_COND_DIM)
    scheduler = LCMScheduler(
        **BETAS, original_inference_steps=50, set_alpha_to_one=True, timestep_scaling=10.0, prediction_type="epsilon"
    )
    return LatentConsistencyModelPipeline(
        vae=sd.vae, text_encoder=sd.text_encoder, tokenizer=sd.tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def build_tiny_sdxl_pipeline(words: list[str], seed: int = 0) -> StableDiffusionXLPipeline:
    """Two CLIP encoders of hidden 32 (the second with a 32-d projection), a text-time UNet, Euler ancestral."""
    sd = build_tiny_pipeline(TinySizes(words=words), seed=seed)
    torch.manual_seed(seed + 1)
    te = sd.text_encoder.config
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**{**te.to_dict(), "projection_dim": te.hidden_size}))
    hidden = te.hidden_size
    unet = UNet2DConditionModel(
        sample_size=sd.unet.config.sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=2 * hidden,
        attention_head_dim=8,
        norm_num_groups=8,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=hidden + 6 * 8,
        use_linear_projection=True,
    )
    scheduler = EulerAncestralDiscreteScheduler(**BETAS, timestep_spacing="trailing", steps_offset=1)
    return StableDiffusionXLPipeline(
        vae=sd.vae, text_encoder=sd.text_encoder, text_encoder_2=text_encoder_2, tokenizer=sd.tokenizer,
        tokenizer_2=sd.tokenizer, unet=unet, scheduler=scheduler, force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )


def save_tiny(pipe, out_dir: str | Path) -> Path:
    """``save_pretrained`` into ``out_dir``, written atomically (a .tmp sibling, then renamed)."""
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp, safe_serialization=True)
    tmp.replace(out)
    return out


def build_tiny_lcm(out_dir: str | Path, seed: int = 0) -> Path:
    return save_tiny(build_tiny_lcm_pipeline(RANDOM_TINY_WORDS, seed), out_dir)


def build_tiny_sdxl(out_dir: str | Path, seed: int = 0) -> Path:
    return save_tiny(build_tiny_sdxl_pipeline(RANDOM_TINY_WORDS, seed), out_dir)
