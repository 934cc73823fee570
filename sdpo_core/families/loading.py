"""Models by family: load a base model, save and reload what training produced.

The family is read from the model directory's ``model_index.json`` (``model.family``
overrides), so pointing ``model.pretrained`` at another model directory is all a user changes.
A trained model directory holds the LoRA in the format its family's diffusers pipeline loads
with ``load_lora_weights`` (or the full denoiser in ``unet/`` / ``transformer/``) plus
``sdpo_model.json`` naming the base model and family. A local base is also recorded relative to
the trained directory (``base_model_dir``), so the model loads from any working directory and
moves with its run directory; a hub base keeps its id and revision (``base_revision``). Files
written before that hold only ``base_model`` (a path relative to the working directory then, or
a hub id) and are read as before.
"""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path
from typing import Any

import torch
from peft.utils import get_peft_model_state_dict

from sdpo_core.families import FAMILIES, Family, family_for
from sdpo_core.families.hub import ModelLoadError, read_json_object

MODEL_META = "sdpo_model.json"
#: ``model.mixed_precision`` -> the dtype of the frozen modules (and of autocast)
DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def read_model_meta(model_dir: str | Path) -> dict[str, Any]:
    """``sdpo_model.json`` of a trained model directory: base model, finetune, family, base LoRA."""
    path = Path(model_dir) / MODEL_META
    if not path.is_file():
        raise ModelLoadError(f"{model_dir} is not a trained sdpo model directory (no {MODEL_META})")
    meta = read_json_object(path, "base_model", "finetune")
    if meta["finetune"] not in ("lora", "full"):
        raise ModelLoadError(f"{path}: expected 'finetune' to be 'lora' or 'full', got {meta['finetune']!r}")
    for key, kinds in (("family", (str,)), ("base_lora", (str,)), ("base_lora_scale", (int, float))):
        value = meta.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, kinds)):
            raise ModelLoadError(f"{path}: expected '{key}' to be a {' or '.join(k.__name__ for k in kinds)}, "
                                 f"got {value!r}")
    return meta


def denoiser_folder(family: Family) -> str:
    """The pipeline component the denoiser is saved as: ``unet`` or ``transformer``."""
    return "unet" if hasattr(family.pipe, "unet") else "transformer"


def family_name(family: Family) -> str:
    return next(name for name, cls in FAMILIES.items() if type(family) is cls)


def load_family(pretrained: str, revision: str | None = None, device: torch.device | str = "cpu",
                dtype: torch.dtype = torch.float32, family: str | None = None,
                options: dict[str, Any] | None = None, resolution: int | None = None,
                base_lora: str | None = None, base_lora_scale: float = 1.0,
                denoiser_dtype: torch.dtype = torch.float32) -> Family:
    """The base model as its family; ``options`` go to the family's ``load`` (e.g. SDXL's ``vae``),
    and ``resolution`` to families that condition on the image size (SDXL's time ids). Every module
    is read in ``dtype`` but the denoiser, in ``denoiser_dtype`` (float32: the trainer's full
    fine-tune keeps float32 master weights; LoRA training, evaluation and serving pass ``dtype``).
    ``base_lora``: a few-step LoRA (LCM-LoRA, Hyper-SD, TCD; a local dir or hub id) loaded with the
    pipeline's own ``load_lora_weights`` and fused into the denoiser at ``base_lora_scale``: the
    result is the base that training starts from (fused in float32, then cast to ``denoiser_dtype``)."""
    cls = family_for(pretrained, family, revision)
    kwargs = dict(options or {})
    accepted = inspect.signature(cls.load).parameters
    if resolution is not None and "resolution" in accepted:
        kwargs.setdefault("resolution", resolution)
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ModelLoadError(f"model.family_options {unknown} are not options of the {cls.__name__} family; "
                             f"it takes {sorted(set(accepted) - {'cls', 'pretrained', 'revision', 'device', 'dtype', 'denoiser_dtype'})}")
    if "denoiser_dtype" in kwargs:
        raise ModelLoadError("model.family_options: denoiser_dtype is set by model.mixed_precision, not an option")
    loaded = cls.load(pretrained, revision, device, dtype, torch.float32 if base_lora else denoiser_dtype, **kwargs)
    if base_lora:
        fuse_base_lora(loaded, base_lora, base_lora_scale)
        loaded.denoiser.to(dtype=denoiser_dtype)
    return loaded


def fuse_base_lora(family: Family, source: str, scale: float) -> None:
    """Fuse a LoRA into the frozen denoiser (diffusers' load_lora_weights + fuse_lora), then drop
    the adapter so that only the training LoRA is ever an adapter."""
    pipe = family.pipe
    try:
        pipe.load_lora_weights(source, adapter_name="sdpo_base_lora")
    except Exception as exc:  # missing dir, hub id not reachable, keys of another family
        raise ModelLoadError(f"model.base_lora '{source}': cannot load it into {type(pipe).__name__} ({exc})") from exc
    pipe.fuse_lora(lora_scale=scale, adapter_names=["sdpo_base_lora"])
    pipe.unload_lora_weights()
    family.denoiser.requires_grad_(False)


def load_for_config(model_cfg: Any, device: torch.device | str, dtype: torch.dtype,
                    resolution: int | None, denoiser_dtype: torch.dtype = torch.float32) -> Family:
    """``load_family`` with a ``ModelConfig``'s keys."""
    m = model_cfg
    return load_family(m.pretrained, m.revision, device, dtype, m.family, m.family_options, resolution,
                       m.base_lora, m.base_lora_scale, denoiser_dtype)


def trained_base(model_dir: str | Path, meta: dict[str, Any]) -> tuple[str, str | None]:
    """(base model, revision) of a trained directory: the local base recorded relative to it when
    that exists, else ``base_model`` as written (absolute, a hub id, or an older file's path
    relative to the working directory)."""
    rel = meta.get("base_model_dir")
    if rel is not None and (Path(model_dir) / rel).is_dir():
        return str((Path(model_dir) / rel).resolve()), None
    return meta["base_model"], meta.get("base_revision")


def save_trained(family: Family, denoiser: torch.nn.Module, out_dir: str | Path, finetune: str, base: str,
                 base_lora: str | None = None, base_lora_scale: float = 1.0, revision: str | None = None,
                 mixed_precision: str = "no", lora_weights: dict[str, torch.Tensor] | None = None) -> Path:
    """Final weights: LoRA in the family's diffusers format (``lora_weights`` in peft's naming when the
    denoiser's own are sharded, else read from it), or the full denoiser; ``base`` (a local
    directory or a hub id at ``revision``) is recorded as ``trained_base`` reads it. A model trained in
    half precision records it (``mixed_precision``): generation and serving then load it so."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if finetune == "lora":
        family.save_lora(get_peft_model_state_dict(denoiser) if lora_weights is None else lora_weights, out)
    else:
        denoiser.save_pretrained(out / denoiser_folder(family), safe_serialization=True)
    meta: dict[str, Any] = {"base_model": base, "finetune": finetune, "family": family_name(family)}
    if Path(base).is_dir():
        # (a directory written aside and renamed to a sibling, as training's final.tmp, keeps it valid)
        meta["base_model_dir"] = os.path.relpath(Path(base).resolve(), out.resolve())
    elif revision:
        meta["base_revision"] = revision
    if base_lora:  # the trained LoRA applies on top of the base with this LoRA fused in
        meta.update({"base_lora": base_lora, "base_lora_scale": base_lora_scale})
    if mixed_precision != "no":  # float32 (the default) is not written: its files stay as they were
        meta["mixed_precision"] = mixed_precision
    (out / MODEL_META).write_text(json.dumps(meta, indent=2))
    return out


def load_trained(model_dir: str | Path, base: str | None = None, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, revision: str | None = None,
                 options: dict[str, Any] | None = None, resolution: int | None = None) -> Family:
    """The base model (``base``, else the one the trained dir names) with the trained weights applied,
    every module (the denoiser too) in ``dtype``."""
    meta = read_model_meta(model_dir)
    if base is None:
        base, recorded = trained_base(model_dir, meta)
        revision = revision or recorded
    family = load_family(base, revision, device, dtype, meta.get("family"), options,
                         resolution, meta.get("base_lora"), meta.get("base_lora_scale", 1.0), dtype)
    if meta["finetune"] == "lora":
        family.load_lora(Path(model_dir))
    else:
        folder = Path(model_dir) / denoiser_folder(family)
        if not folder.is_dir():
            raise ModelLoadError(f"{model_dir}: a full fine-tune needs {folder}")
        family.set_denoiser(type(family.denoiser).from_pretrained(folder, dtype=dtype))
    return family


def looks_local(source: str) -> bool:
    """A filesystem path rather than a hub id (``owner/name``): absolute, ``./``, ``~``, or deeper."""
    return source.startswith(("/", ".", "~")) or source.count("/") > 1 or "\\" in source


def check_model_sources(model_cfg: Any) -> None:
    """Raise (``ModelLoadError`` or ``ValueError``, naming the key) when the base model is neither a
    local pipeline directory nor in the HF cache (its ``model_index.json`` is read: no weights), or a
    local file it needs (the LoRA to fuse, a replacement VAE) is missing: before any weights load."""
    m = model_cfg
    family_for(m.pretrained, m.family, m.revision)
    for key, source in (("model.base_lora", m.base_lora), ("model.family_options.vae", m.family_options.get("vae"))):
        if isinstance(source, str) and looks_local(source) and not Path(source).expanduser().exists():
            raise ModelLoadError(f"{key} '{source}': no such file or directory (a local LoRA / model "
                                 "directory, or a hub id owner/name)")
