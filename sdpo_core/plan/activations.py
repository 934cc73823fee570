"""Activation bytes of one denoiser sample, measured on the meta device (``sdpo plan``).

A saved-tensor hook sums what autograd keeps for backward during one forward (parameters and views
of them excluded); attention runs as the fused kernel a GPU would use. Gradient checkpointing is
estimated from the same pass: per checkpointed block only its input is kept, plus the largest
block's own saved tensors (recomputed during backward).
"""

from __future__ import annotations

import torch

#: the blocks diffusers wraps in checkpoints (UNet resnets and attention, MMDiT / FLUX blocks)
CHECKPOINTED = ("ResnetBlock2D", "Transformer2DModel", "JointTransformerBlock", "FluxTransformerBlock",
                "FluxSingleTransformerBlock")
TEXT_LENGTHS = {"sd3": 77 + 256, "flux": 256}  # the sequence the transformer sees (CLIP + T5)


def denoiser_inputs(family: str, den: torch.nn.Module, latent: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """One sample's denoiser call on the meta device: (1, C, latent, latent) latents, a text sequence
    of the pipeline's length and width, and the family's extra conditioning."""
    c = den.config
    meta = dict(device="meta", dtype=dtype)
    if family in ("sd", "sdxl"):
        kw = dict(sample=torch.zeros(1, c.in_channels, latent, latent, **meta), timestep=torch.zeros(1, **meta),
                  encoder_hidden_states=torch.zeros(1, 77, c.cross_attention_dim, **meta))
        if c.get("time_cond_proj_dim"):
            kw["timestep_cond"] = torch.zeros(1, c.time_cond_proj_dim, **meta)
        if c.get("addition_embed_type") == "text_time":
            pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
            kw["added_cond_kwargs"] = dict(text_embeds=torch.zeros(1, pooled, **meta), time_ids=torch.zeros(1, 6, **meta))
        return kw
    text = torch.zeros(1, TEXT_LENGTHS[family], c.joint_attention_dim, **meta)
    pooled = torch.zeros(1, c.pooled_projection_dim, **meta)
    if family == "sd3":
        return dict(hidden_states=torch.zeros(1, c.in_channels, latent, latent, **meta), encoder_hidden_states=text,
                    pooled_projections=pooled, timestep=torch.zeros(1, **meta))
    tokens = (latent // 2) ** 2  # FLUX packs 2 x 2 latent patches: 64 = 16 channels x 4
    return dict(hidden_states=torch.zeros(1, tokens, c.in_channels, **meta), encoder_hidden_states=text,
                pooled_projections=pooled, timestep=torch.zeros(1, **meta),
                img_ids=torch.zeros(tokens, 3, **meta), txt_ids=torch.zeros(TEXT_LENGTHS[family], 3, **meta))


class FusedAttention(torch.overrides.TorchFunctionMode):
    """``scaled_dot_product_attention`` as the fused kernel a GPU runs (flash for half precision,
    memory-efficient for float32): on the meta device torch would pick the math path, which saves
    the (tokens x tokens) attention matrix a GPU never keeps."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention:
            named = dict(zip(("query", "key", "value", "attn_mask", "dropout_p", "is_causal"), args, strict=False)) | kwargs
            if named.get("attn_mask") is None and not named.get("dropout_p") and not named.get("enable_gqa"):
                q, k, v = named["query"], named["key"], named["value"]
                extra = dict(is_causal=named.get("is_causal", False), scale=named.get("scale"))
                if q.dtype in (torch.float16, torch.bfloat16):
                    return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, **extra)[0]
                return torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True, **extra)[0]
        return func(*args, **kwargs)


def saved_bytes(den: torch.nn.Module, inputs: dict) -> tuple[int, int]:
    """Bytes autograd saves for one sample's backward, without and with gradient checkpointing
    (outside the blocks + the blocks' inputs + the largest block's own); parameters and views of
    them excluded."""
    params = {id(p) for p in den.parameters()}
    seen: set[int] = set()
    state = {"total": 0, "block": None, "blocks": {}, "inputs": 0}

    def pack(t: torch.Tensor):
        base = t._base if t._base is not None else t
        if id(t) not in params and id(base) not in params and id(base) not in seen:
            seen.add(id(base))
            n = base.numel() * base.element_size()
            state["total"] += n
            if state["block"] is not None:
                state["blocks"][state["block"]] = state["blocks"].get(state["block"], 0) + n
        return t

    def enter(module, args):
        if state["block"] is None:
            state["block"] = id(module)
            state["inputs"] += sum(a.numel() * a.element_size() for a in args if isinstance(a, torch.Tensor))

    def leave(module, args, out):
        if state["block"] == id(module):
            state["block"] = None

    hooks = [h for m in den.modules() if type(m).__name__ in CHECKPOINTED
             for h in (m.register_forward_pre_hook(enter), m.register_forward_hook(leave))]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), FusedAttention():
            den(**inputs, return_dict=False)
    finally:
        for h in hooks:
            h.remove()
    blocks = state["blocks"].values()
    return state["total"], state["total"] - sum(blocks) + state["inputs"] + max(blocks, default=0)
