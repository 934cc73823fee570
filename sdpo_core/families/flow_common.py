"""What the flow-matching families (SD3, FLUX) share: decoding, timestep handling, LoRA."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

# attention projections of MM-DiT blocks: image stream (to_*) and text/context stream (add_*)
MMDIT_LORA_TARGETS = (
    "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
)


def batch_timesteps(timesteps: torch.Tensor | float, n: int, device: torch.device,
                    dtype: torch.dtype) -> torch.Tensor:
    """Scalar or (N,) timesteps in scheduler units -> (N,) on ``device`` in ``dtype``."""
    t = torch.as_tensor(timesteps).to(device=device, dtype=dtype).reshape(-1)
    if t.numel() not in (1, n):
        raise ValueError(f"timesteps has {t.numel()} entries for a batch of {n} latents")
    return t.expand(n)


@torch.no_grad()
def decode_flow_latents(vae: Any, latents: torch.Tensor) -> torch.Tensor:
    """(N, C, h, w) latents -> (N, 3, H, W) in [0, 1], float32: SD3 / FLUX latents are
    ``(z - shift_factor) * scaling_factor``, so ``z = latents / scaling_factor + shift_factor``."""
    z = latents.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
    images = vae.decode(z, return_dict=False)[0]
    return (images.float() / 2 + 0.5).clamp(0, 1)


def save_transformer_lora(pipeline_cls: Any, lora_layers: dict[str, torch.Tensor], out_dir: Path) -> None:
    """peft-named transformer LoRA weights -> ``out_dir/pytorch_lora_weights.safetensors`` in the
    format ``pipeline_cls.load_lora_weights`` reads (keys prefixed ``transformer.``)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pipeline_cls.save_lora_weights(out, transformer_lora_layers=lora_layers, safe_serialization=True)
