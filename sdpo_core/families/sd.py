"""Stable Diffusion 1.x / 2.x, SD-Turbo and LCM-distilled SD UNets (``StableDiffusionPipeline``).

Loaded through ``hub.py``'s one loader, with the scheduler kept as the model ships it (the
sampler is built from its config: DDIM for DDPM-family schedulers, LCM for ``LCMScheduler``). A UNet with ``time_cond_proj_dim`` (LCM distillation) is conditioned on
the guidance-scale embedding of ``lcm_guidance_scale`` as ``timestep_cond``, computed with the
pipeline's own ``get_guidance_scale_embedding`` from ``w = lcm_guidance_scale - 1`` (diffusers'
LCM pipeline uses the Imagen CFG convention and subtracts 1; its default scale is 8.5).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils import convert_state_dict_to_diffusers

from sdpo_core.families.family import Conditioning, Family
from sdpo_core.families.hub import freeze_pipeline, open_pipeline

LCM_GUIDANCE_SCALE = 8.5  # LatentConsistencyModelPipeline.__call__'s default guidance_scale
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def guidance_embedding(pipe: Any, scale: float) -> torch.Tensor | None:
    """(1, time_cond_proj_dim) float32 embedding of ``scale - 1`` for an LCM UNet, else None."""
    dim = pipe.unet.config.time_cond_proj_dim
    if dim is None:
        return None
    w = torch.tensor([scale - 1.0])
    return pipe.get_guidance_scale_embedding(w, embedding_dim=dim).to(pipe.unet.device)


@torch.no_grad()
def encode_prompts(pipe: Any, prompts: list[str]) -> torch.Tensor:
    """N prompts -> (N, L, D) text-encoder hidden states (as the pipeline conditions on them)."""
    ids = pipe.tokenizer(
        prompts, padding="max_length", truncation=True, max_length=pipe.tokenizer.model_max_length,
        return_tensors="pt",
    ).input_ids.to(pipe.text_encoder.device)
    return pipe.text_encoder(ids)[0]


@torch.no_grad()
def decode_latents(pipe: Any, latents: torch.Tensor) -> torch.Tensor:
    """(N, C, h, w) latents -> (N, 3, H, W) images in [0, 1], float32."""
    vae = pipe.vae
    scaled = latents.to(vae.dtype) / vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None)
    if shift:
        scaled = scaled + shift
    images = vae.decode(scaled, return_dict=False)[0]
    return (images.float() / 2 + 0.5).clamp(0, 1)


class SDFamily(Family):
    """``StableDiffusionPipeline`` (and ``LatentConsistencyModelPipeline`` directories, loaded as one)."""

    pipeline_classes: ClassVar[tuple[str, ...]] = ("StableDiffusionPipeline", "LatentConsistencyModelPipeline")
    default_lora_targets: ClassVar[tuple[str, ...]] = LORA_TARGETS
    pipeline_cls: ClassVar[type] = StableDiffusionPipeline

    def __init__(self, pipe: Any, lcm_guidance_scale: float = LCM_GUIDANCE_SCALE) -> None:
        super().__init__(pipe)
        self.lcm_guidance_scale = lcm_guidance_scale
        self._timestep_cond = guidance_embedding(pipe, lcm_guidance_scale)

    @classmethod
    def load(cls, pretrained: str, revision: str | None, device: torch.device | str, dtype: torch.dtype,
             denoiser_dtype: torch.dtype = torch.float32, lcm_guidance_scale: float = LCM_GUIDANCE_SCALE) -> SDFamily:
        dtypes = {"default": dtype, "unet": denoiser_dtype}
        pipe = open_pipeline(StableDiffusionPipeline, pretrained, revision, dtypes, safety_checker=None)
        freeze_pipeline(pipe, device, dtypes)
        return cls(pipe, lcm_guidance_scale=lcm_guidance_scale)

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.pipe.unet

    def set_denoiser(self, module: torch.nn.Module) -> None:
        self.pipe.unet = module.to(self.pipe.device).requires_grad_(False).eval()

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> Conditioning:
        return Conditioning({"encoder_hidden_states": encode_prompts(self.pipe, prompts)})

    def unet_kwargs(self, latents: torch.Tensor) -> dict[str, torch.Tensor]:
        """``timestep_cond`` (N, D) for an LCM UNet, in the latents' dtype as the pipelines pass it."""
        if self._timestep_cond is None:
            return {}
        cond = self._timestep_cond.to(latents.device, latents.dtype)
        return {"timestep_cond": cond.expand(latents.shape[0], -1)}

    def denoise(self, model: torch.nn.Module, latents: torch.Tensor, timesteps: torch.Tensor,
                cond: Conditioning) -> torch.Tensor:
        t = torch.as_tensor(timesteps, device=latents.device)
        return model(
            latents, t, encoder_hidden_states=cond.tensors["encoder_hidden_states"], return_dict=False,
            **self.unet_kwargs(latents),
        )[0]

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return decode_latents(self.pipe, latents)

    def latent_shape(self, resolution: int | None) -> tuple[int, int, int]:
        factor = self.pipe.vae_scale_factor
        size = resolution or self.pipe.unet.config.sample_size * factor
        if size % factor:
            raise ValueError(f"resolution {size} is not a multiple of the VAE's scale factor {factor}")
        return (self.pipe.unet.config.in_channels, size // factor, size // factor)

    def save_lora(self, lora_layers: dict[str, torch.Tensor], out_dir: Path) -> None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        layers = convert_state_dict_to_diffusers(dict(lora_layers))
        self.pipeline_cls.save_lora_weights(str(out_dir), unet_lora_layers=layers, safe_serialization=True)

    def load_lora(self, model_dir: Path) -> None:
        self.pipe.load_lora_weights(str(model_dir))
