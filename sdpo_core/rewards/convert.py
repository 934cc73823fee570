"""Convert published reward-model pickles into the safetensors directories the rewards load.

Run once per model (the sources come from the authors; see docs/rewards.md)::

    python -m sdpo_core.rewards.convert aesthetic sac+logos+ava1-l14-linearMSE.pth OUT_DIR \
        [--clip openai/clip-vit-large-patch14]
    python -m sdpo_core.rewards.convert hpsv2 HPS_v2.1_compressed.pt OUT_DIR \
        [--tokenizer laion/CLIP-ViT-H-14-laion2B-s32B-b79K]
    python -m sdpo_core.rewards.convert imagereward ImageReward.pt OUT_DIR [--tokenizer bert-base-uncased]

Sources are read with ``torch.load(..., weights_only=True)``: tensors and plain containers only,
so a tampered pickle cannot run code. Every source tensor must land somewhere (or be on a short
list of known unused ones), and the result is loaded strictly into the target model.
"""

from __future__ import annotations

import argparse
import math
import pickle
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from sdpo_core.rewards import RewardError
from sdpo_core.rewards.aesthetic import HEAD_FILE
from sdpo_core.rewards.clip_common import head_from_state_dict

StateDict = dict[str, torch.Tensor]


def load_source(src: str | Path) -> StateDict:
    """Read a published checkpoint safely; unwrap ``{'state_dict': ...}`` and DataParallel's ``module.``."""
    src = Path(src)
    if not src.is_file():
        raise RewardError(f"checkpoint not found: {src}")
    try:
        obj = torch.load(src, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise RewardError(f"{src} holds objects other than tensors; refusing to unpickle it ({exc})") from exc
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise RewardError(f"{src} is not a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def _rename(state: StateDict, rules: list[tuple[str, str]], ignore: tuple[str, ...], what: str) -> StateDict:
    """Apply the first matching regex rule to each key; unmatched keys not in ``ignore`` are an error."""
    out, unmapped = {}, []
    for key, value in state.items():
        for pattern, repl in rules:
            if re.fullmatch(pattern, key):
                out[re.sub(pattern, repl, key)] = value
                break
        else:
            if not key.startswith(ignore):
                unmapped.append(key)
    if unmapped:
        raise RewardError(
            f"{what}: {len(unmapped)} tensors have no place in the target model: {unmapped[:8]}"
        )
    return out


def _num_layers(state: StateDict, prefix: str) -> int:
    idx = {int(m.group(1)) for k in state if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    return max(idx) + 1 if idx else 0


# ---------------------------------------------------------------- OpenCLIP (HPSv2) -> transformers CLIP

_OPENCLIP_BLOCK = [
    ("ln_1", "layer_norm1"),
    ("ln_2", "layer_norm2"),
    ("attn.out_proj", "self_attn.out_proj"),
    ("attn.q_proj", "self_attn.q_proj"),
    ("attn.k_proj", "self_attn.k_proj"),
    ("attn.v_proj", "self_attn.v_proj"),
    ("mlp.c_fc", "mlp.fc1"),
    ("mlp.c_proj", "mlp.fc2"),
]
_OPENCLIP_RULES = [
    (r"visual\.conv1\.weight", "vision_model.embeddings.patch_embedding.weight"),
    (r"visual\.class_embedding", "vision_model.embeddings.class_embedding"),
    (r"visual\.positional_embedding", "vision_model.embeddings.position_embedding.weight"),
    (r"visual\.ln_pre\.(weight|bias)", r"vision_model.pre_layrnorm.\1"),  # sic: transformers' name
    (r"visual\.ln_post\.(weight|bias)", r"vision_model.post_layernorm.\1"),
    (r"token_embedding\.weight", "text_model.embeddings.token_embedding.weight"),
    (r"positional_embedding", "text_model.embeddings.position_embedding.weight"),
    (r"ln_final\.(weight|bias)", r"text_model.final_layer_norm.\1"),
    (r"logit_scale", "logit_scale"),
] + [
    (rf"{src}transformer\.resblocks\.(\d+)\.{re.escape(a)}\.(weight|bias)", rf"{dst}encoder.layers.\1.{b}.\2")
    for src, dst in ((r"visual\.", "vision_model."), ("", "text_model."))
    for a, b in _OPENCLIP_BLOCK
]


def openclip_to_transformers(
    state: StateDict, vision_heads: int, text_heads: int, eos_token_id: int | None = None
) -> tuple[Any, StateDict]:
    """OpenCLIP ViT state dict -> (transformers ``CLIPConfig``, ``CLIPModel`` state dict).

    Dims are read from the tensors; head counts are not visible in them (ViT-H/14: 16 and 16).
    ``nn.MultiheadAttention``'s packed ``in_proj`` splits into q/k/v; OpenCLIP's projections are
    applied as ``x @ P`` so they transpose into ``Linear`` weights.
    """
    from transformers import CLIPConfig

    state = dict(state)
    for side in ("visual.", ""):
        for i in range(_num_layers(state, f"{side}transformer.resblocks.")):
            attn = f"{side}transformer.resblocks.{i}.attn."
            for kind in ("weight", "bias"):
                for name, part in zip("qkv", state.pop(f"{attn}in_proj_{kind}").chunk(3, dim=0), strict=True):
                    state[f"{attn}{name}_proj.{kind}"] = part
    proj = {
        "visual_projection.weight": state.pop("visual.proj").T,
        "text_projection.weight": state.pop("text_projection").T,
    }
    out = _rename(state, _OPENCLIP_RULES, ("attn_mask",), "hpsv2 (OpenCLIP)") | proj
    out = {k: v.contiguous() for k, v in out.items()}
    return _clip_config(CLIPConfig, out, vision_heads, text_heads, eos_token_id), out


def _clip_config(
    cls: Any, sd: StateDict, vision_heads: int, text_heads: int, eos_token_id: int | None
) -> Any:
    patch = sd["vision_model.embeddings.patch_embedding.weight"]
    grid = math.isqrt(sd["vision_model.embeddings.position_embedding.weight"].shape[0] - 1)
    vocab, text_width = sd["text_model.embeddings.token_embedding.weight"].shape
    vision = dict(
        hidden_size=patch.shape[0],
        patch_size=patch.shape[-1],
        image_size=grid * patch.shape[-1],
        num_hidden_layers=_num_layers(sd, "vision_model.encoder.layers."),
        num_attention_heads=vision_heads,
        intermediate_size=sd["vision_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
        hidden_act="gelu",
    )
    text = dict(
        hidden_size=text_width,
        vocab_size=vocab,
        num_attention_heads=text_heads,
        max_position_embeddings=sd["text_model.embeddings.position_embedding.weight"].shape[0],
        num_hidden_layers=_num_layers(sd, "text_model.encoder.layers."),
        hidden_act="gelu",
        intermediate_size=sd["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
        # OpenCLIP pools at argmax(token id) = <|endoftext|>, the last id of CLIP's BPE vocabulary.
        eos_token_id=vocab - 1 if eos_token_id is None else eos_token_id,
        bos_token_id=None,
        pad_token_id=None,
    )
    return cls(text_config=text, vision_config=vision, projection_dim=sd["visual_projection.weight"].shape[0])


def convert_hpsv2(
    src: str | Path,
    out_dir: str | Path,
    tokenizer: str | None = None,
    vision_heads: int = 16,
    text_heads: int = 16,
) -> Path:
    """HPSv2 OpenCLIP checkpoint -> ``OUT_DIR`` loadable by ``CLIPModel.from_pretrained``."""
    from transformers import AutoTokenizer, CLIPModel

    tok = AutoTokenizer.from_pretrained(tokenizer) if tokenizer else None
    config, sd = openclip_to_transformers(
        load_source(src), vision_heads, text_heads, tok.eos_token_id if tok is not None else None
    )
    model = CLIPModel(config)
    _load_strict(model, sd, "hpsv2")
    model.save_pretrained(str(out_dir), safe_serialization=True)
    if tok is not None:
        tok.save_pretrained(str(out_dir))
    return Path(out_dir)


# ---------------------------------------------------------------- ImageReward (BLIP) -> transformers BLIP

_BLIP_RULES = [
    (r"blip\.visual_encoder\.cls_token", "vision_model.embeddings.class_embedding"),
    (r"blip\.visual_encoder\.pos_embed", "vision_model.embeddings.position_embedding"),
    (
        r"blip\.visual_encoder\.patch_embed\.proj\.(weight|bias)",
        r"vision_model.embeddings.patch_embedding.\1",
    ),
    (r"blip\.visual_encoder\.norm\.(weight|bias)", r"vision_model.post_layernorm.\1"),
    (
        r"blip\.visual_encoder\.blocks\.(\d+)\.norm1\.(weight|bias)",
        r"vision_model.encoder.layers.\1.layer_norm1.\2",
    ),
    (
        r"blip\.visual_encoder\.blocks\.(\d+)\.norm2\.(weight|bias)",
        r"vision_model.encoder.layers.\1.layer_norm2.\2",
    ),
    (
        r"blip\.visual_encoder\.blocks\.(\d+)\.attn\.qkv\.(weight|bias)",
        r"vision_model.encoder.layers.\1.self_attn.qkv.\2",
    ),
    (
        r"blip\.visual_encoder\.blocks\.(\d+)\.attn\.proj\.(weight|bias)",
        r"vision_model.encoder.layers.\1.self_attn.projection.\2",
    ),
    (
        r"blip\.visual_encoder\.blocks\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)",
        r"vision_model.encoder.layers.\1.mlp.\2.\3",
    ),
    # BLIP's BERT (med.py) uses the same module names as transformers' BlipTextModel.
    (r"blip\.text_encoder\.(.+)", r"text_encoder.\1"),
    (r"mlp\.layers\.(\d+)\.(weight|bias)", r"mlp.layers.\1.\2"),
]
# Parts of BLIP_Pretrain that ImageReward's score never uses.
_BLIP_UNUSED = ("blip.vision_proj.", "blip.text_proj.", "blip.text_encoder.embeddings.position_ids")


def imagereward_to_transformers(
    state: StateDict, vision_heads: int = 16, text_heads: int = 12
) -> tuple[Any, StateDict]:
    """ImageReward state dict -> (``BlipConfig``, :class:`ImageRewardModel` state dict).

    Published: ViT-L/16 (1024 wide, 24 layers, 16 heads, LayerNorm eps 1e-6) and BERT-base
    (768 wide, 12 layers, 12 heads) cross-attending to the 1024-wide image tokens.
    """
    from transformers import BlipConfig

    sd = _rename(state, _BLIP_RULES, _BLIP_UNUSED, "imagereward (BLIP)")
    patch = sd["vision_model.embeddings.patch_embedding.weight"]
    grid = math.isqrt(sd["vision_model.embeddings.position_embedding"].shape[1] - 1)
    vocab, width = sd["text_encoder.embeddings.word_embeddings.weight"].shape
    vision = dict(
        hidden_size=patch.shape[0],
        patch_size=patch.shape[-1],
        image_size=grid * patch.shape[-1],
        num_hidden_layers=_num_layers(sd, "vision_model.encoder.layers."),
        num_attention_heads=vision_heads,
        intermediate_size=sd["vision_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
        layer_norm_eps=1e-6,
    )
    text = dict(
        hidden_size=width,
        vocab_size=vocab,
        num_attention_heads=text_heads,
        is_decoder=True,
        num_hidden_layers=_num_layers(sd, "text_encoder.encoder.layer."),
        layer_norm_eps=1e-12,
        intermediate_size=sd["text_encoder.encoder.layer.0.intermediate.dense.weight"].shape[0],
        max_position_embeddings=sd["text_encoder.embeddings.position_embeddings.weight"].shape[0],
        bos_token_id=None,
        sep_token_id=None,
        pad_token_id=0,
    )
    return BlipConfig(vision_config=vision, text_config=text), {k: v.contiguous() for k, v in sd.items()}


def convert_imagereward(
    src: str | Path,
    out_dir: str | Path,
    tokenizer: str | None = None,
    vision_heads: int = 16,
    text_heads: int = 12,
) -> Path:
    """``ImageReward.pt`` -> ``OUT_DIR`` with config.json + model.safetensors (+ tokenizer)."""
    from transformers import AutoTokenizer

    from sdpo_core.rewards.imagereward import ImageRewardModel

    config, sd = imagereward_to_transformers(load_source(src), vision_heads, text_heads)
    model = ImageRewardModel(config)
    _load_strict(model, sd, "imagereward")
    model.save(out_dir)
    if tokenizer:
        AutoTokenizer.from_pretrained(tokenizer).save_pretrained(str(out_dir))
    return Path(out_dir)


# ---------------------------------------------------------------- LAION aesthetic head


def convert_aesthetic(src: str | Path, out_dir: str | Path, clip: str | None = None) -> Path:
    """``sac+logos+ava1-l14-linearMSE.pth`` -> ``OUT_DIR/aesthetic_head.safetensors`` (+ ``OUT_DIR/clip``)."""
    state = load_source(src)
    head = head_from_state_dict("aesthetic", state, str(src))  # checks the published layout
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(out / HEAD_FILE))
    if clip:
        from sdpo_core.rewards.aesthetic import load_clip_vision

        load_clip_vision(clip, None, torch.float32).save_pretrained(
            str(out / "clip"), safe_serialization=True
        )
    return out


def _load_strict(model: torch.nn.Module, sd: StateDict, what: str) -> None:
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as exc:
        raise RewardError(f"{what}: converted tensors do not fit the target model: {exc}") from exc


CONVERTERS: dict[str, Callable[..., Path]] = {
    "aesthetic": convert_aesthetic,
    "hpsv2": convert_hpsv2,
    "imagereward": convert_imagereward,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sdpo_core.rewards.convert",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", choices=sorted(CONVERTERS))
    parser.add_argument("src", help="the published checkpoint (.pt / .pth)")
    parser.add_argument("out_dir")
    parser.add_argument("--tokenizer", help="hpsv2/imagereward: tokenizer dir or hub id to copy into OUT_DIR")
    parser.add_argument("--clip", help="aesthetic: CLIP ViT-L/14 dir or hub id to copy into OUT_DIR/clip")
    parser.add_argument(
        "--vision-heads", type=int, help="attention heads of the image tower (default: published)"
    )
    parser.add_argument(
        "--text-heads", type=int, help="attention heads of the text tower (default: published)"
    )
    args = parser.parse_args(argv)
    kwargs: dict[str, Any] = {}
    if args.model == "aesthetic":
        kwargs["clip"] = args.clip
    else:
        kwargs["tokenizer"] = args.tokenizer
        kwargs.update(
            {k: v for k, v in (("vision_heads", args.vision_heads), ("text_heads", args.text_heads)) if v}
        )
    try:
        out = CONVERTERS[args.model](args.src, args.out_dir, **kwargs)
    except KeyError as exc:  # a tensor the published layout has is absent
        print(
            f"error: {args.src} lacks tensor {exc}; is it the published {args.model} checkpoint?",
            file=sys.stderr,
        )
        return 1
    except (RewardError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {out}; use it with --set reward.name={args.model} --set reward.options.path={out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
