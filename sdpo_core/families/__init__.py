"""Model families (see ``family.py``): one file per diffusers pipeline class.

``family_for`` reads the pipeline class (``_class_name`` of ``model_index.json``) of a local
directory, or of a hub id already in the HF cache, and returns the family that loads it;
``model.family`` (a name of ``FAMILIES``) overrides. A new family is one file plus one line in
``FAMILIES``. Loading and saving by family: ``loading.py``; the one pipeline loader every family
uses: ``hub.py``; the training LoRA: ``lora.py``.
"""

from __future__ import annotations

from sdpo_core.families.family import Conditioning, Family
from sdpo_core.families.flux import FluxFamily
from sdpo_core.families.hub import UnsupportedModelError, pipeline_class_of
from sdpo_core.families.sd import SDFamily
from sdpo_core.families.sd3 import SD3Family
from sdpo_core.families.sdxl import SDXLFamily

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


def family_for(pretrained: str, override: str | None = None, revision: str | None = None) -> type[Family]:
    """The family class for a model: ``override`` (a ``FAMILIES`` name) or by its pipeline class."""
    if override is not None:
        if override not in FAMILIES:
            raise UnsupportedModelError(f"model.family {override!r} is not a family; known: {sorted(FAMILIES)}")
        return FAMILIES[override]
    class_name = pipeline_class_of(pretrained, revision)
    by_class = supported_pipeline_classes()
    if class_name not in by_class:
        raise UnsupportedModelError(
            f"'{pretrained}': pipeline class {class_name!r} is not supported; supported: {sorted(by_class)} "
            f"(or set model.family to one of {sorted(FAMILIES)})"
        )
    return FAMILIES[by_class[class_name]]


__all__ = ["FAMILIES", "Conditioning", "Family", "family_for", "pipeline_class_of", "supported_pipeline_classes"]
