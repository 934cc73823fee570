"""The one pipeline loader: a diffusers pipeline from a local directory or a hub id, frozen.

Every family loads through ``open_pipeline`` (``from_pretrained`` in the training dtypes, with
errors that say what was tried) and ``freeze_pipeline`` (frozen, eval mode, in the training
dtypes, then on the device: no float32 copy of a half-precision model is ever made on the GPU);
``pipeline_class_of`` reads which pipeline class a model is before any weights load.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch


class ModelLoadError(RuntimeError):
    """A model directory or hub id could not be loaded; the message says what was tried."""


class UnsupportedModelError(ModelLoadError, ValueError):
    """A model whose pipeline class no family loads (or an unknown ``model.family``)."""


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
    return read_json_object(index, "_class_name")["_class_name"]


def read_json_object(path: Path, *keys: str) -> dict[str, Any]:
    """A JSON object from ``path`` holding string ``keys``, or ModelLoadError naming the file and what
    it holds instead (not JSON, not UTF-8, a list, a key missing or not a string)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{path}: not valid JSON ({exc}); expected a JSON object with {list(keys)}") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: expected a JSON object with {list(keys)}, got a {type(data).__name__}")
    for key in keys:
        if not isinstance(data.get(key), str):
            raise ModelLoadError(f"{path}: expected '{key}' to be a string, got {data.get(key)!r}")
    return data


def open_pipeline(pipeline_cls: Any, pretrained: str, revision: str | None = None,
                  dtypes: dict[str, torch.dtype] | None = None, **kwargs: Any) -> Any:
    """``pipeline_cls.from_pretrained`` of a local diffusers directory or a hub id, progress bars off.

    ``dtypes``: the dtype each component is loaded in (diffusers' ``dtype`` dict: component name ->
    dtype, ``"default"`` for the others), so that weights are read straight into it (half the host
    memory of a float32 load for bf16 / fp16). ``kwargs`` go to ``from_pretrained`` (e.g. a component
    replaced or left out). Raises
    ``ModelLoadError`` naming what was tried when the directory is not a pipeline or the hub id
    cannot be reached (nor found in the HF cache).
    """
    local = Path(pretrained).expanduser()
    if local.exists() and not (local / "model_index.json").is_file():
        raise ModelLoadError(f"{local} exists but is not a diffusers pipeline directory (no model_index.json)")
    source = str(local) if local.exists() else pretrained
    try:
        pipe = pipeline_cls.from_pretrained(source, revision=revision, dtype=dtypes, **kwargs)
    except Exception as exc:  # diffusers raises several types for missing / unreachable models
        raise ModelLoadError(
            f"cannot load model '{pretrained}' as {pipeline_cls.__name__}: {exc}. Give a local diffusers "
            "directory, or a hub id on a machine that can reach the hub (or whose HF cache already holds it)"
        ) from exc
    pipe.set_progress_bar_config(disable=True)
    return pipe


def freeze_pipeline(pipe: Any, device: torch.device | str, dtypes: dict[str, torch.dtype]) -> None:
    """Every module of the pipeline frozen, in eval mode, cast to its dtype in ``dtypes`` (component
    name -> dtype, ``"default"`` for the others: the denoiser float32 where the trainer keeps float32
    master weights, a VAE that overflows in half precision) and then moved to ``device``."""
    modules = {name: m for name, m in pipe.components.items() if isinstance(m, torch.nn.Module)}
    for name, module in modules.items():
        module.requires_grad_(False)
        module.eval()
        module.to(dtype=dtypes.get(name, dtypes["default"]))
    pipe.to(device)
