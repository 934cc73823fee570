"""The one pipeline loader: a diffusers pipeline from a local directory or a hub id, frozen.

Every family loads through ``open_pipeline`` (``from_pretrained`` with errors that say what was
tried) and ``freeze_pipeline`` (frozen, eval mode, on the device, in the training dtypes);
``pipeline_class_of`` reads which pipeline class a model is before any weights load.
"""

from __future__ import annotations

import json
from collections.abc import Collection
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


def open_pipeline(pipeline_cls: Any, pretrained: str, revision: str | None = None, **kwargs: Any) -> Any:
    """``pipeline_cls.from_pretrained`` of a local diffusers directory or a hub id, progress bars off.

    ``kwargs`` go to ``from_pretrained`` (e.g. a component replaced or left out). Raises
    ``ModelLoadError`` naming what was tried when the directory is not a pipeline or the hub id
    cannot be reached (nor found in the HF cache).
    """
    local = Path(pretrained).expanduser()
    if local.exists() and not (local / "model_index.json").is_file():
        raise ModelLoadError(f"{local} exists but is not a diffusers pipeline directory (no model_index.json)")
    source = str(local) if local.exists() else pretrained
    try:
        pipe = pipeline_cls.from_pretrained(source, revision=revision, **kwargs)
    except Exception as exc:  # diffusers raises several types for missing / unreachable models
        raise ModelLoadError(
            f"cannot load model '{pretrained}' as {pipeline_cls.__name__}: {exc}. Give a local diffusers "
            "directory, or a hub id on a machine that can reach the hub (or whose HF cache already holds it)"
        ) from exc
    pipe.set_progress_bar_config(disable=True)
    return pipe


def freeze_pipeline(pipe: Any, device: torch.device | str, dtype: torch.dtype,
                    float32: Collection[str] = ()) -> None:
    """Every module of the pipeline frozen, in eval mode and on ``device``; cast to ``dtype``, except
    the components named in ``float32`` (the denoiser, which the trainer casts itself; a VAE that
    overflows in half precision)."""
    modules = {name: m for name, m in pipe.components.items() if isinstance(m, torch.nn.Module)}
    for module in modules.values():
        module.requires_grad_(False)
        module.eval()
    pipe.to(device)
    for name, module in modules.items():
        module.to(dtype=torch.float32 if name in float32 else dtype)
