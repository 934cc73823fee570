"""SDXL and SDXL-Turbo (``StableDiffusionXLPipeline``): two CLIP text encoders, text-time conditioning.

Conditioning as the SDXL pipeline builds it: the penultimate hidden states of both encoders
concatenated (N, L, D1 + D2), ``text_embeds`` = text_encoder_2's pooled projection (N, P) and
``time_ids`` = (orig_h, orig_w, crop_top, crop_left, target_h, target_w) = (r, r, 0, 0, r, r) for
square images of ``resolution`` px, fixed when the family is loaded (the pipeline's defaults for
``original_size`` / ``crops_coords_top_left`` / ``target_size``). SDXL's VAE overflows in fp16:
when its config sets ``force_upcast`` and ``dtype`` is float16 the VAE stays in float32 (the
pipeline upcasts it for every decode), unless a replacement ``vae`` directory (e.g. an fp16-fixed
VAE) is given.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from diffusers import AutoencoderKL, StableDiffusionXLPipeline

from sdpo_core.families.family import Conditioning
from sdpo_core.families.hub import ModelLoadError, freeze_pipeline, open_pipeline
from sdpo_core.families.sd import LCM_GUIDANCE_SCALE, SDFamily


def check_add_embedding(pipe: Any) -> None:
    """The UNet's added embedding must take 6 time ids and text_encoder_2's projection (as diffusers checks)."""
    passed = pipe.unet.config.addition_time_embed_dim * 6 + pipe.text_encoder_2.config.projection_dim
    expected = pipe.unet.add_embedding.linear_1.in_features
    if passed != expected:
        raise ModelLoadError(
            f"the SDXL UNet's added embedding takes {expected} values, but 6 time ids x "
            f"addition_time_embed_dim + text_encoder_2's projection_dim make {passed}"
        )


def open_vae(path: str) -> AutoencoderKL:
    """A replacement VAE from a diffusers ``AutoencoderKL`` directory (holding config.json)."""
    try:
        return AutoencoderKL.from_pretrained(path)
    except Exception as exc:  # diffusers raises several types for missing / malformed models
        raise ModelLoadError(f"cannot load the replacement VAE '{path}': {exc}") from exc


class SDXLFamily(SDFamily):
    """``StableDiffusionXLPipeline`` (SDXL, SDXL-Turbo; LCM-SDXL UNets get ``timestep_cond`` too)."""

    pipeline_classes: ClassVar[tuple[str, ...]] = ("StableDiffusionXLPipeline",)
    pipeline_cls: ClassVar[type] = StableDiffusionXLPipeline

    def __init__(self, pipe: Any, resolution: int | None = None,
                 lcm_guidance_scale: float = LCM_GUIDANCE_SCALE) -> None:
        super().__init__(pipe, lcm_guidance_scale=lcm_guidance_scale)
        check_add_embedding(pipe)
        self.resolution = resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor

    @classmethod
    def load(cls, pretrained: str, revision: str | None, device: torch.device | str, dtype: torch.dtype,
             denoiser_dtype: torch.dtype = torch.float32, resolution: int | None = None, vae: str | None = None,
             lcm_guidance_scale: float = LCM_GUIDANCE_SCALE) -> SDXLFamily:
        extra = {"vae": open_vae(vae)} if vae else {}
        # in fp16 the VAE is read in float32 until its config says whether it must stay so (force_upcast)
        dtypes = {"default": dtype, "unet": denoiser_dtype, "vae": torch.float32 if dtype == torch.float16 else dtype}
        pipe = open_pipeline(StableDiffusionXLPipeline, pretrained, revision, dtypes, **extra)
        if getattr(pipe.vae.config, "latents_mean", None) is not None:
            raise ModelLoadError(f"{pretrained}: a VAE with latents_mean / latents_std is not supported")
        upcast = dtype == torch.float16 and pipe.vae.config.force_upcast
        freeze_pipeline(pipe, device, {**dtypes, "vae": torch.float32 if upcast else dtype})
        return cls(pipe, resolution=resolution, lcm_guidance_scale=lcm_guidance_scale)

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> Conditioning:
        pipe = self.pipe
        states, pooled = [], None
        for tokenizer, encoder in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)):
            ids = tokenizer(
                prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                return_tensors="pt",
            ).input_ids.to(encoder.device)
            out = encoder(ids, output_hidden_states=True)
            states.append(out.hidden_states[-2])
            pooled = out[0]  # text_encoder_2 (with projection): the pooled, projected embedding (N, P)
        hidden = torch.cat(states, dim=-1).to(pipe.text_encoder_2.dtype)
        r = self.resolution
        time_ids = torch.tensor([[r, r, 0, 0, r, r]], dtype=hidden.dtype, device=hidden.device)
        return Conditioning({
            "encoder_hidden_states": hidden,
            "text_embeds": pooled,
            "time_ids": time_ids.repeat(len(prompts), 1),
        })

    def denoise(self, model: torch.nn.Module, latents: torch.Tensor, timesteps: torch.Tensor,
                cond: Conditioning) -> torch.Tensor:
        c = cond.tensors
        t = torch.as_tensor(timesteps, device=latents.device)
        added = {"text_embeds": c["text_embeds"], "time_ids": c["time_ids"]}
        return model(
            latents, t, encoder_hidden_states=c["encoder_hidden_states"], added_cond_kwargs=added,
            return_dict=False, **self.unet_kwargs(latents),
        )[0]

    def latent_shape(self, resolution: int | None) -> tuple[int, int, int]:
        if resolution is not None and resolution != self.resolution:
            raise ValueError(
                f"this SDXL family conditions on {self.resolution} px images (time_ids); load it with "
                f"resolution={resolution} to sample at {resolution} px"
            )
        return super().latent_shape(self.resolution)
