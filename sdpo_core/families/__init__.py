"""Model families (see ``base.py``): one file per diffusers pipeline class.

``family_for`` reads the pipeline class (``_class_name`` of ``model_index.json``) of a local
directory, or of a hub id already in the HF cache, and returns the family that loads it;
``model.family`` (a name of ``FAMILIES``) overrides. A new family is one file plus one line in
``FAMILIES``.
"""

from __future__ import annotations

import json
from pathlib import Path

from sdpo_core.families.base import Conditioning, Family
from sdpo_core.families.flux import FluxFamily
from sdpo_core.families.sd import SDFamily
from sdpo_core.families.sd3 import SD3Family
from sdpo_core.families.sdxl import SDXLFamily
from sdpo_core.models import ModelLoadError

#: ``model.family`` name -> family class; each class lists the ``_class_name`` values it loads
FAMILIES: dict[str, type[Family]] = {
    "sd": SDFamily,
    "sdxl": SDXLFamily,
    "sd3": SD3Family,
    "flux": FluxFamily,
}


def supported_pipeline_classes() -> dict[str, str]:
    """diffusers pipeline class -> family name, over every registered family."""
    return {cls_name: name for name, fam in FAMILIES.items() for cls_name in fam.pipeline_classes}


def pipeline_class_of(pretrained: str, revision: str | None = None) -> str:
    """``_class_name`` of the model_index.json of a local directory, or of a hub id in the HF cache."""
    local = Path(pretrained).expanduser()
    if local.exists():
        index = local / "model_index.json"
        if not index.is_file():
            raise ModelLoadError(f"{local} is not a diffusers pipeline directory (no model_index.json)")
    else:
        try:
            from huggingface_hub import hf_hub_download

            # the cache first; the hub only where it can be reached (HF_HUB_OFFLINE unset)
            index = Path(hf_hub_download(pretrained, "model_index.json", revision=revision))
        except Exception as exc:  # not installed, not a repo id, not in the cache and no network
            raise ModelLoadError(
                f"cannot load model '{pretrained}': its model_index.json is neither a local directory nor in "
                f"the Hugging Face cache, and the hub cannot be reached from here ({type(exc).__name__}). "
                "Download it on a machine with network access (huggingface-cli download "
                f"{pretrained}) or set model.pretrained to a local diffusers directory"
            ) from exc
    try:
        return json.loads(index.read_text())["_class_name"]
    except (json.JSONDecodeError, KeyError) as exc:
        raise ModelLoadError(f"{index}: expected a JSON object with '_class_name' ({exc})") from exc


def family_for(pretrained: str, override: str | None = None, revision: str | None = None) -> type[Family]:
    """The family class for a model: ``override`` (a ``FAMILIES`` name) or by its pipeline class."""
    if override is not None:
        if override not in FAMILIES:
            raise ValueError(f"model.family {override!r} is not a family; known: {sorted(FAMILIES)}")
        return FAMILIES[override]
    class_name = pipeline_class_of(pretrained, revision)
    by_class = supported_pipeline_classes()
    if class_name not in by_class:
        raise ValueError(
            f"'{pretrained}': pipeline class {class_name!r} is not supported; supported: {sorted(by_class)} "
            f"(or set model.family to one of {sorted(FAMILIES)})"
        )
    return FAMILIES[by_class[class_name]]


__all__ = ["FAMILIES", "Conditioning", "Family", "family_for", "pipeline_class_of", "supported_pipeline_classes"]
