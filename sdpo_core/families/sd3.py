"""Stable Diffusion 3 / 3.5 (``StableDiffusion3Pipeline``): an MM-DiT on 2x2 patches of 16-channel
latents, flow velocity prediction, ``FlowMatchEulerDiscreteScheduler``.

Conditioning is what ``pipe.encode_prompt`` builds without classifier-free guidance: the two CLIP
encoders' penultimate hidden states (concatenated, zero-padded to the T5 width) followed by T5's
hidden states (zeros when ``text_encoder_3`` is None) as ``encoder_hidden_states`` (N, 77 + L, D),
and both CLIPs' pooled projections concatenated as ``pooled_projections`` (N, P).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch
from diffusers import StableDiffusion3Pipeline

from sdpo_core.families.family import Conditioning, Family
from sdpo_core.families.flow_common import (
    MMDIT_LORA_TARGETS,
    batch_timesteps,
    decode_flow_latents,
    save_transformer_lora,
)
from sdpo_core.families.hub import freeze_pipeline, open_pipeline, read_json_object


def _has_t5(pretrained: str) -> bool:
    """Whether a local SD3 directory ships T5 (``text_encoder_3`` named in model_index.json); a hub
    id is assumed to (SD3 / SD3.5 releases do)."""
    index = Path(pretrained).expanduser() / "model_index.json"
    if not index.is_file():
        return True
    entry = read_json_object(index).get("text_encoder_3")
    return bool(isinstance(entry, list) and entry and entry[0])


class SD3Family(Family):
    pipeline_classes: ClassVar[tuple[str, ...]] = ("StableDiffusion3Pipeline",)
    default_lora_targets: ClassVar[tuple[str, ...]] = MMDIT_LORA_TARGETS

    def __init__(self, pipe: StableDiffusion3Pipeline, max_sequence_length: int = 256) -> None:
        super().__init__(pipe)
        self.max_sequence_length = max_sequence_length

    @classmethod
    def load(cls, pretrained: str, revision: str | None, device: torch.device | str, dtype: torch.dtype,
             denoiser_dtype: torch.dtype = torch.float32, use_t5: bool | None = None, max_sequence_length: int = 256, **options: Any) -> SD3Family:
        """``use_t5=False`` loads without T5 (``text_encoder_3=None``): its hidden states are zeros,
        as the pipeline makes them; None (default): T5 if the model directory has one.
        ``max_sequence_length`` is the pipeline's T5 length (256)."""
        if options:
            raise ValueError(f"unknown SD3 family options {sorted(options)}; known: use_t5, max_sequence_length")
        if use_t5 is None:
            use_t5 = _has_t5(pretrained)
        kwargs = {} if use_t5 else {"text_encoder_3": None, "tokenizer_3": None}
        dtypes = {"default": dtype, "transformer": denoiser_dtype}
        pipe = open_pipeline(StableDiffusion3Pipeline, pretrained, revision, dtypes, **kwargs)
        freeze_pipeline(pipe, device, dtypes)
        return cls(pipe, max_sequence_length=max_sequence_length)

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.pipe.transformer

    def set_denoiser(self, module: torch.nn.Module) -> None:
        self.pipe.transformer = module

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> Conditioning:
        hidden, _, pooled, _ = self.pipe.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, device=self.pipe._execution_device,
            do_classifier_free_guidance=False, max_sequence_length=self.max_sequence_length,
        )
        return Conditioning({"encoder_hidden_states": hidden, "pooled_projections": pooled})

    def denoise(self, model: torch.nn.Module, latents: torch.Tensor, timesteps: torch.Tensor,
                cond: Conditioning) -> torch.Tensor:
        """Flow velocity (N, C, h, w); the SD3 pipeline passes timesteps in scheduler units as is."""
        t = batch_timesteps(timesteps, latents.shape[0], latents.device, torch.float32)
        return model(
            hidden_states=latents, timestep=t,
            encoder_hidden_states=cond.tensors["encoder_hidden_states"],
            pooled_projections=cond.tensors["pooled_projections"], return_dict=False,
        )[0]

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return decode_flow_latents(self.pipe.vae, latents)

    def latent_shape(self, resolution: int | None) -> tuple[int, int, int]:
        scale = self.pipe.vae_scale_factor
        size = (resolution or self.pipe.default_sample_size * scale) // scale
        return (self.pipe.transformer.config.in_channels, size, size)

    def sampler_options(self, latent_shape: tuple[int, int, int]) -> dict[str, Any]:
        """The pipeline's schedule: ``set_timesteps(T)``, and the patch count that its shift ``mu``
        depends on (used if the scheduler shifts dynamically, as the pipeline does)."""
        patch = self.pipe.transformer.config.patch_size
        return {"sigma_schedule": "scheduler", "image_seq_len": (latent_shape[1] // patch) * (latent_shape[2] // patch)}

    def save_lora(self, lora_layers: dict[str, torch.Tensor], out_dir: Path) -> None:
        save_transformer_lora(StableDiffusion3Pipeline, lora_layers, out_dir)

    def lora_exclude_modules(self) -> list[str]:
        # the last joint block is context_pre_only: its text-stream query feeds nothing downstream
        blocks = self.pipe.transformer.transformer_blocks
        return [f"transformer_blocks.{i}.attn.add_q_proj" for i, b in enumerate(blocks) if b.context_pre_only]

    def load_lora(self, model_dir: Path) -> None:
        self.pipe.load_lora_weights(str(model_dir))
