"""The model-family interface (docs/architecture.md): what the trainer, sampler loop and evaluation ask of a model.

A family wraps one diffusers pipeline class (SD 1.x/2.x/SD-Turbo and LCM UNets, SDXL, SD3, FLUX)
behind the same small contract, so that the training loop never branches on the model:

    fam = family_class.load(pretrained, revision, device, dtype)
    cond = fam.encode(prompts)                      # Conditioning of N rows
    out = fam.denoise(fam.denoiser, x_t, t, cond)   # native prediction (eps / v / x0 / flow velocity)
    images = fam.decode(x0)                         # (N, 3, H, W) in [0, 1], float32

Latents handed to and returned by a family are always (N, C, h, w): a family whose transformer
works on packed tokens (FLUX) packs and unpacks inside ``denoise``. Timesteps ``t`` are in the
units of the family's scheduler (``scheduler.timesteps`` after ``set_timesteps``): integer
DDPM timesteps for UNets, ``sigma * num_train_timesteps`` for flow models; the family converts
them the way its diffusers pipeline does before calling the denoiser.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch


@dataclass(frozen=True)
class Conditioning:
    """Prompt conditioning of N items: named tensors that all have N rows (dim 0).

    SD: ``encoder_hidden_states`` (N, L, D). SDXL adds ``text_embeds`` (N, P) and ``time_ids``
    (N, 6). SD3 / FLUX: ``encoder_hidden_states`` and ``pooled_projections``. Anything that is
    not per item (FLUX's position ids, LCM's guidance embedding) is made inside ``denoise``.
    Behaves like a tensor for the operations the trainer needs: index rows, concatenate,
    repeat, move, and save (``tensors`` is a plain dict of tensors).
    """

    tensors: dict[str, torch.Tensor]

    def __post_init__(self) -> None:
        sizes = {k: v.shape[0] for k, v in self.tensors.items()}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"conditioning tensors disagree on the number of rows: {sizes}")

    def __len__(self) -> int:
        return next(iter(self.tensors.values())).shape[0]

    def __getitem__(self, rows: Any) -> Conditioning:
        """Rows by index, slice, bool mask or (b,) index tensor; always keeps dim 0."""
        if isinstance(rows, int):
            rows = slice(rows, rows + 1)
        return Conditioning({k: v[rows] for k, v in self.tensors.items()})

    @staticmethod
    def cat(parts: Sequence[Conditioning]) -> Conditioning:
        keys = parts[0].tensors.keys()
        return Conditioning({k: torch.cat([p.tensors[k] for p in parts]) for k in keys})

    def repeat(self, k: int) -> Conditioning:
        """k copies stacked as [all rows; all rows; ...] (the layout of a 2B pair batch)."""
        return Conditioning({n: v.repeat(k, *([1] * (v.ndim - 1))) for n, v in self.tensors.items()})

    def expand(self, n: int) -> Conditioning:
        """A 1-row conditioning (e.g. the empty prompt) broadcast to n rows, without a copy."""
        if len(self) != 1:
            raise ValueError(f"expand needs a 1-row conditioning, this one has {len(self)} rows")
        return Conditioning({k: v.expand(n, *v.shape[1:]) for k, v in self.tensors.items()})

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Conditioning:
        """Move every tensor; ``dtype`` applies to floating-point tensors only."""
        return Conditioning({
            k: v.to(device=device, dtype=dtype if (dtype is not None and v.is_floating_point()) else None)
            for k, v in self.tensors.items()
        })

    def cpu(self) -> Conditioning:
        return self.to("cpu")


class Family(ABC):
    """One diffusers pipeline class behind the trainer's contract. Subclasses live one per file."""

    #: the ``_class_name`` values of ``model_index.json`` this family loads
    pipeline_classes: ClassVar[tuple[str, ...]] = ()
    #: the peft ``target_modules`` of the denoiser when ``model.lora_target_modules`` is not set
    default_lora_targets: ClassVar[tuple[str, ...]] = ()

    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe

    # ---------------------------------------------------------------- loading
    @classmethod
    @abstractmethod
    def load(cls, pretrained: str, revision: str | None, device: torch.device | str, dtype: torch.dtype,
             denoiser_dtype: torch.dtype = torch.float32, **options: Any) -> Family:
        """Load from a local diffusers directory or hub id, each weight read straight into its dtype;
        every module frozen and in eval mode, text encoders and VAE in ``dtype``, the denoiser in
        ``denoiser_dtype`` (float32 where the trainer keeps float32 master weights)."""

    @property
    @abstractmethod
    def denoiser(self) -> torch.nn.Module:
        """The trained network (``pipe.unet`` or ``pipe.transformer``)."""

    @abstractmethod
    def set_denoiser(self, module: torch.nn.Module) -> None:
        """Replace the denoiser (a fully fine-tuned one loaded from a trained model dir)."""

    @property
    def scheduler_config(self) -> dict[str, Any]:
        """The model's own scheduler config (samplers are built from it), with its ``_class_name``
        (which ``scheduler.config`` leaves out but ``samplers.build_sampler`` reads)."""
        return {**self.pipe.scheduler.config, "_class_name": type(self.pipe.scheduler).__name__}

    def lora_exclude_modules(self) -> list[str]:
        """Full names of denoiser modules that match the LoRA targets but cannot affect the output
        (an adapter there would never train)."""
        return []

    def sampler_options(self, latent_shape: tuple[int, int, int]) -> dict[str, Any]:
        """Sampler options this model's pipeline implies (a flow model's sigma schedule and the image
        token count its shift depends on): model facts, the sampler does the math."""
        return {}

    # ---------------------------------------------------------------- the three calls
    @abstractmethod
    @torch.no_grad()
    def encode(self, prompts: list[str]) -> Conditioning:
        """N prompts -> Conditioning of N rows, on the pipeline's device."""

    @abstractmethod
    def denoise(self, model: torch.nn.Module, latents: torch.Tensor, timesteps: torch.Tensor,
                cond: Conditioning) -> torch.Tensor:
        """The denoiser's native output for latents (N, C, h, w) at timesteps (N,) or scalar (in the
        scheduler's units), conditioned on ``cond`` (N rows). ``model`` is passed explicitly so the
        trainer can call the accelerate-wrapped module; gradients flow when enabled."""

    @abstractmethod
    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(N, C, h, w) latents -> (N, 3, H, W) images in [0, 1], float32 (undoing the VAE's
        scaling and shift; families whose VAE overflows in fp16 decode in float32)."""

    @abstractmethod
    def latent_shape(self, resolution: int | None) -> tuple[int, int, int]:
        """(C, h, w) of the latents for square images of ``resolution`` px (model default if None)."""

    # ---------------------------------------------------------------- weights
    @abstractmethod
    def save_lora(self, lora_layers: dict[str, torch.Tensor], out_dir: Path) -> None:
        """Write peft-named LoRA weights of the denoiser in the format this family's diffusers
        pipeline loads with ``load_lora_weights(out_dir)``."""

    @abstractmethod
    def load_lora(self, model_dir: Path) -> None:
        """Apply a LoRA directory written by ``save_lora`` (``pipe.load_lora_weights``)."""
