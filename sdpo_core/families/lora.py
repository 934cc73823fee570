"""The training LoRA on a family's denoiser (peft): add it, read its weights, find its parameters.

Saving it in a pipeline's own format is the family's (``Family.save_lora``).
"""

from __future__ import annotations

import torch
from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict


def add_lora(denoiser: torch.nn.Module, rank: int, alpha: float | None, target_modules: list[str],
             exclude_modules: list[str] | None = None) -> None:
    """Add a trainable LoRA adapter (peft) to the denoiser's attention projections; base stays frozen.
    ``exclude_modules``: full names of matching modules that must not get one (no path to the output)."""
    denoiser.requires_grad_(False)
    config = LoraConfig(
        r=rank, lora_alpha=alpha or rank, init_lora_weights="gaussian", target_modules=target_modules,
        exclude_modules=exclude_modules or None,
    )
    denoiser.add_adapter(config)
    for p in denoiser.parameters():  # LoRA weights train in float32 even when the base is half
        if p.requires_grad:
            p.data = p.data.float()


def skip_lora_input_casts(denoiser: torch.nn.Module) -> int:
    """Stop peft casting each adapted layer's input to the float32 LoRA dtype; returns the layers.

    Only for a denoiser every call of which runs under autocast (the trainer's ``denoiser_caller``):
    there peft's cast of the half-precision input to float32 is undone by autocast's cast back to
    half precision before the adapter's matmul, a lossless round trip (forward and backward) that
    costs two copies per adapted layer and call. The attribute is the one peft's own
    ``peft.helpers.disable_input_dtype_casting`` sets, set once instead of around every call.
    """
    layers = [m for m in denoiser.modules() if isinstance(m, BaseTunerLayer)]
    for m in layers:
        m.cast_input_dtype_enabled = False
    return len(layers)


def lora_state_dict(denoiser: torch.nn.Module, state_dict: dict[str, torch.Tensor] | None = None,
                    ) -> dict[str, torch.Tensor]:
    """The adapter's weights in peft's naming (what checkpoints save and restore), on the CPU; taken
    from ``state_dict`` (the denoiser's own naming, e.g. gathered from its shards) when given."""
    return {k: v.detach().cpu().contiguous()
            for k, v in get_peft_model_state_dict(denoiser, state_dict=state_dict).items()}


def lora_param_keys(denoiser: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """peft's checkpoint key of every adapter weight -> the live parameter holding it.

    Resolved once by storage (``get_peft_model_state_dict`` returns views of the parameters), so
    that a checkpoint can copy the adapter without walking the whole model's state dict again.
    """
    params = {(p.data_ptr(), tuple(p.shape)): p for p in denoiser.parameters() if p.requires_grad}
    keys = {}
    for k, v in get_peft_model_state_dict(denoiser).items():
        p = params.get((v.data_ptr(), tuple(v.shape)))
        if p is None:
            raise RuntimeError(f"LoRA weight {k!r} is not a trainable parameter of the denoiser")
        keys[k] = p
    return keys
