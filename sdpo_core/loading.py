"""Models by family: load a base model, save and reload what training produced.

The family is read from the model directory's ``model_index.json`` (``model.family``
overrides), so pointing ``model.pretrained`` at another model directory is all a user changes.
A trained model directory holds the LoRA in the format its family's diffusers pipeline loads
with ``load_lora_weights`` (or the full denoiser in ``unet/`` / ``transformer/``) plus
``sdpo_model.json`` naming the base model and family.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import torch
from peft.utils import get_peft_model_state_dict

from sdpo_core.families import FAMILIES, Family, family_for
from sdpo_core.models import MODEL_META, ModelLoadError, read_model_meta


def denoiser_folder(family: Family) -> str:
    """The pipeline component the denoiser is saved as: ``unet`` or ``transformer``."""
    return "unet" if hasattr(family.pipe, "unet") else "transformer"


def family_name(family: Family) -> str:
    return next(name for name, cls in FAMILIES.items() if type(family) is cls)


def load_family(pretrained: str, revision: str | None = None, device: torch.device | str = "cpu",
                dtype: torch.dtype = torch.float32, family: str | None = None,
                options: dict[str, Any] | None = None, resolution: int | None = None) -> Family:
    """The base model as its family; ``options`` go to the family's ``load`` (e.g. SDXL's ``vae``),
    and ``resolution`` to families that condition on the image size (SDXL's time ids)."""
    cls = family_for(pretrained, family, revision)
    kwargs = dict(options or {})
    accepted = inspect.signature(cls.load).parameters
    if resolution is not None and "resolution" in accepted:
        kwargs.setdefault("resolution", resolution)
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ModelLoadError(f"model.family_options {unknown} are not options of the {cls.__name__} family; "
                             f"it takes {sorted(set(accepted) - {'cls', 'pretrained', 'revision', 'device', 'dtype'})}")
    return cls.load(pretrained, revision, device, dtype, **kwargs)


def save_trained(family: Family, denoiser: torch.nn.Module, out_dir: str | Path, finetune: str, base: str) -> Path:
    """Final weights: LoRA in the family's diffusers format, or the full denoiser."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if finetune == "lora":
        family.save_lora(get_peft_model_state_dict(denoiser), out)
    else:
        denoiser.save_pretrained(out / denoiser_folder(family), safe_serialization=True)
    meta = {"base_model": base, "finetune": finetune, "family": family_name(family)}
    (out / MODEL_META).write_text(json.dumps(meta, indent=2))
    return out


def load_trained(model_dir: str | Path, base: str | None = None, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, revision: str | None = None,
                 options: dict[str, Any] | None = None, resolution: int | None = None) -> Family:
    """The base model (``base``, else the one the trained dir names) with the trained weights applied."""
    meta = read_model_meta(model_dir)
    family = load_family(base or meta["base_model"], revision, device, dtype, meta.get("family"), options,
                         resolution)
    if meta["finetune"] == "lora":
        family.load_lora(Path(model_dir))
    else:
        folder = Path(model_dir) / denoiser_folder(family)
        if not folder.is_dir():
            raise ModelLoadError(f"{model_dir}: a full fine-tune needs {folder}")
        family.set_denoiser(type(family.denoiser).from_pretrained(folder))
    return family
