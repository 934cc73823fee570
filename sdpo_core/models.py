"""Load diffusers pipelines (local dir or hub id), add LoRA with peft, save and reload weights.

A trained model is a directory holding either the LoRA in the diffusers format that
``pipe.load_lora_weights`` takes (``pytorch_lora_weights.safetensors``) or a full ``unet/``,
plus ``sdpo_model.json`` naming the base model it applies to.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

log = logging.getLogger(__name__)

MODEL_META = "sdpo_model.json"
DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class ModelLoadError(RuntimeError):
    """A model directory or hub id could not be loaded; the message says what was tried."""


def open_pipeline(pipeline_cls: type, pretrained: str, revision: str | None = None, **kwargs):
    """``pipeline_cls.from_pretrained`` of a local diffusers directory or a hub id, progress bars off.

    Raises ``ModelLoadError`` naming what was tried when the directory is not a pipeline or the
    hub id cannot be reached (nor found in the HF cache).
    """
    local = Path(pretrained).expanduser()
    source = str(local) if local.exists() else pretrained
    if local.exists() and not (local / "model_index.json").is_file():
        raise ModelLoadError(f"{local} exists but is not a diffusers pipeline directory (no model_index.json)")
    try:
        pipe = pipeline_cls.from_pretrained(source, revision=revision, **kwargs)
    except Exception as exc:  # diffusers raises several types for missing / unreachable models
        raise ModelLoadError(
            f"cannot load model '{pretrained}': {exc}. Give a local diffusers directory, or a hub id on a "
            "machine that can reach the hub (or whose HF cache already holds it)"
        ) from exc
    pipe.set_progress_bar_config(disable=True)
    return pipe


def freeze_pipeline(pipe, device: torch.device | str, dtypes: dict[str, torch.dtype]) -> None:
    """Every module of the pipeline frozen, in eval mode and on ``device``; each component named in
    ``dtypes`` cast to its dtype (the others keep theirs)."""
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.requires_grad_(False)
            module.eval()
    pipe.to(device)
    for name, dtype in dtypes.items():
        getattr(pipe, name).to(dtype=dtype)


def load_pipeline(
    pretrained: str,
    revision: str | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    timestep_spacing: str | None = None,
) -> StableDiffusionPipeline:
    """Load a Stable Diffusion-style pipeline with a DDIM scheduler, frozen and ready to sample.

    ``pretrained`` is a local diffusers directory or a hub id (e.g. ``stabilityai/sd-turbo``).
    The scheduler is rebuilt as ``DDIMScheduler`` from the model's own scheduler config, so the
    timestep schedule (betas, prediction type, spacing) stays the model's.
    """
    pipe = open_pipeline(StableDiffusionPipeline, pretrained, revision, safety_checker=None)
    extra = {"timestep_spacing": timestep_spacing} if timestep_spacing else {}
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, **extra)
    pipe.safety_checker = None
    freeze_pipeline(pipe, device, {"vae": dtype, "text_encoder": dtype})
    return pipe


def add_lora(unet: torch.nn.Module, rank: int, alpha: float | None, target_modules: list[str],
             exclude_modules: list[str] | None = None) -> None:
    """Add a trainable LoRA adapter (peft) to the denoiser's attention projections; base stays frozen.
    ``exclude_modules``: full names of matching modules that must not get one (no path to the output)."""
    unet.requires_grad_(False)
    config = LoraConfig(
        r=rank, lora_alpha=alpha or rank, init_lora_weights="gaussian", target_modules=target_modules,
        exclude_modules=exclude_modules or None,
    )
    unet.add_adapter(config)
    for p in unet.parameters():  # LoRA weights train in float32 even when the base is half
        if p.requires_grad:
            p.data = p.data.float()


def lora_state_dict(unet: UNet2DConditionModel) -> dict[str, torch.Tensor]:
    """The adapter's weights in peft's naming (what checkpoints save and restore)."""
    return {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(unet).items()}


def lora_param_keys(unet: UNet2DConditionModel) -> dict[str, torch.nn.Parameter]:
    """peft's checkpoint key of every adapter weight -> the live parameter holding it.

    Resolved once by storage (``get_peft_model_state_dict`` returns views of the parameters), so
    that a checkpoint can copy the adapter without walking the whole model's state dict again.
    """
    params = {(p.data_ptr(), tuple(p.shape)): p for p in unet.parameters() if p.requires_grad}
    keys = {}
    for k, v in get_peft_model_state_dict(unet).items():
        p = params.get((v.data_ptr(), tuple(v.shape)))
        if p is None:
            raise RuntimeError(f"LoRA weight {k!r} is not a trainable parameter of the UNet")
        keys[k] = p
    return keys


def save_trained(unet: UNet2DConditionModel, out_dir: str | Path, finetune: str, base: str) -> Path:
    """Save final weights: LoRA in diffusers format (``load_lora_weights``) or the full UNet."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if finetune == "lora":
        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
        StableDiffusionPipeline.save_lora_weights(out, unet_lora_layers=layers, safe_serialization=True)
    else:
        unet.save_pretrained(out / "unet", safe_serialization=True)
    (out / MODEL_META).write_text(json.dumps({"base_model": base, "finetune": finetune}, indent=2))
    return out


def read_model_meta(model_dir: str | Path) -> dict:
    path = Path(model_dir) / MODEL_META
    if not path.is_file():
        raise ModelLoadError(f"{model_dir} is not a trained sdpo model directory (no {MODEL_META})")
    return json.loads(path.read_text())


@torch.no_grad()
def decode_latents(pipe: StableDiffusionPipeline, latents: torch.Tensor) -> torch.Tensor:
    """(N, C, h, w) latents -> (N, 3, H, W) images in [0, 1], float32."""
    vae = pipe.vae
    scaled = latents.to(vae.dtype) / vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None)
    if shift:
        scaled = scaled + shift
    images = vae.decode(scaled, return_dict=False)[0]
    return (images.float() / 2 + 0.5).clamp(0, 1)


@torch.no_grad()
def encode_prompts(pipe: StableDiffusionPipeline, prompts: list[str]) -> torch.Tensor:
    """N prompts -> (N, L, D) text-encoder hidden states (as the pipeline conditions on them)."""
    ids = pipe.tokenizer(
        prompts, padding="max_length", truncation=True, max_length=pipe.tokenizer.model_max_length,
        return_tensors="pt",
    ).input_ids.to(pipe.text_encoder.device)
    return pipe.text_encoder(ids)[0]
