"""FLUX.1 (``FluxPipeline``; schnell and dev): an MM-DiT over 2x2-packed 16-channel latents, flow
velocity prediction, ``FlowMatchEulerDiscreteScheduler``.

Conditioning is what ``pipe.encode_prompt`` builds: T5 hidden states as ``encoder_hidden_states``
(N, L, D) and CLIP's pooled output as ``pooled_projections`` (N, P). The text and image position
ids and the guidance embedding (FLUX.1-dev only; schnell has none) are not per item and are made
in ``denoise``. Latents enter and leave ``denoise`` as (N, C, h, w); the transformer sees the
packed (N, h/2 * w/2, 4C) tokens.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch
from diffusers import FluxPipeline

from sdpo_core.families.family import Conditioning, Family
from sdpo_core.families.flow_common import (
    MMDIT_LORA_TARGETS,
    batch_timesteps,
    decode_flow_latents,
    save_transformer_lora,
)
from sdpo_core.families.hub import freeze_pipeline, open_pipeline


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(N, C, h, w) -> (N, h/2 * w/2, 4C): each 2x2 patch becomes one token, channels-major
    (token feature c * 4 + 2 * dy + dx), patches in row-major order."""
    n, c, h, w = latents.shape
    if h % 2 or w % 2:
        raise ValueError(f"FLUX latents need even height and width, got {h}x{w}")
    x = latents.reshape(n, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(n, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(N, h/2 * w/2, 4C) -> (N, C, h, w); the inverse of ``pack_latents``."""
    n, _, d = tokens.shape
    x = tokens.reshape(n, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(n, d // 4, h, w)


def image_ids(h: int, w: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(h/2 * w/2, 3) position ids of the packed tokens: (0, row, column)."""
    rows = torch.arange(h // 2, device=device).repeat_interleave(w // 2)
    cols = torch.arange(w // 2, device=device).repeat(h // 2)
    return torch.stack([torch.zeros_like(rows), rows, cols], dim=1).to(dtype)


class FluxFamily(Family):
    pipeline_classes: ClassVar[tuple[str, ...]] = ("FluxPipeline",)
    default_lora_targets: ClassVar[tuple[str, ...]] = MMDIT_LORA_TARGETS

    def __init__(self, pipe: FluxPipeline, max_sequence_length: int = 256, guidance_scale: float = 3.5) -> None:
        super().__init__(pipe)
        self.max_sequence_length = max_sequence_length
        self.guidance_scale = guidance_scale

    @classmethod
    def load(cls, pretrained: str, revision: str | None, device: torch.device | str, dtype: torch.dtype,
             denoiser_dtype: torch.dtype = torch.float32, max_sequence_length: int = 256, guidance_scale: float = 3.5, **options: Any) -> FluxFamily:
        """``max_sequence_length``: T5 tokens (schnell's limit is 256); ``guidance_scale``: the
        distilled-guidance embedding of FLUX.1-dev (ignored by schnell, which has none)."""
        if options:
            raise ValueError(
                f"unknown FLUX family options {sorted(options)}; known: max_sequence_length, guidance_scale"
            )
        dtypes = {"default": dtype, "transformer": denoiser_dtype}
        pipe = open_pipeline(FluxPipeline, pretrained, revision, dtypes)
        freeze_pipeline(pipe, device, dtypes)
        return cls(pipe, max_sequence_length=max_sequence_length, guidance_scale=guidance_scale)

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.pipe.transformer

    def set_denoiser(self, module: torch.nn.Module) -> None:
        self.pipe.transformer = module

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> Conditioning:
        hidden, pooled, _ = self.pipe.encode_prompt(
            prompt=prompts, prompt_2=None, device=self.pipe._execution_device,
            max_sequence_length=self.max_sequence_length,
        )
        return Conditioning({"encoder_hidden_states": hidden, "pooled_projections": pooled})

    def denoise(self, model: torch.nn.Module, latents: torch.Tensor, timesteps: torch.Tensor,
                cond: Conditioning) -> torch.Tensor:
        """Flow velocity (N, C, h, w). As FluxPipeline: timesteps in the latents' dtype, / 1000."""
        n, _, h, w = latents.shape
        hidden = cond.tensors["encoder_hidden_states"]
        t = batch_timesteps(timesteps, n, latents.device, latents.dtype)
        guidance = None
        if self.pipe.transformer.config.guidance_embeds:
            guidance = torch.full((n,), self.guidance_scale, device=latents.device, dtype=torch.float32)
        out = model(
            hidden_states=pack_latents(latents), timestep=t / 1000, guidance=guidance,
            pooled_projections=cond.tensors["pooled_projections"], encoder_hidden_states=hidden,
            txt_ids=torch.zeros(hidden.shape[1], 3, device=latents.device, dtype=hidden.dtype),
            img_ids=image_ids(h, w, latents.device, latents.dtype), return_dict=False,
        )[0]
        return unpack_latents(out, h, w)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return decode_flow_latents(self.pipe.vae, latents)

    def latent_shape(self, resolution: int | None) -> tuple[int, int, int]:
        scale = self.pipe.vae_scale_factor
        size = 2 * ((resolution or self.pipe.default_sample_size * scale) // (scale * 2))
        return (self.pipe.transformer.config.in_channels // 4, size, size)

    def sampler_options(self, latent_shape: tuple[int, int, int]) -> dict[str, Any]:
        """FluxPipeline's schedule: sigmas linspace(1, 1/T, T), and the packed token count that its
        shift ``mu`` depends on (used if the config shifts dynamically, as FLUX.1-dev's does)."""
        return {"sigma_schedule": "uniform", "image_seq_len": (latent_shape[1] // 2) * (latent_shape[2] // 2)}

    def save_lora(self, lora_layers: dict[str, torch.Tensor], out_dir: Path) -> None:
        save_transformer_lora(FluxPipeline, lora_layers, out_dir)

    def load_lora(self, model_dir: Path) -> None:
        self.pipe.load_lora_weights(str(model_dir))
