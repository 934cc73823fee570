"""Warm start (``model.init_from``): the training LoRA starts from trained weights, not a random init.

``init_from`` is a ``models:/`` URI (``models:/NAME@champion``: the registry's champion), a run
directory (its ``final/``) or a trained model directory (``sdpo_model.json`` + the family's LoRA
file). The weights must fit the run exactly: a LoRA, trained on the same base model and family, with
the same adapted modules and rank; anything else is a :class:`WarmStartError` naming the difference.

The random LoRA init still runs first (same RNG draws as a cold start), then every adapter weight is
overwritten by the loaded one, so the first epoch starts from the loaded weights bit for bit.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from diffusers.utils import convert_unet_state_dict_to_peft
from safetensors.torch import load_file

from sdpo_core.config import ConfigError
from sdpo_core.families.loading import denoiser_folder, family_name, read_model_meta
from sdpo_core.rundir import ranks
from sdpo_core.tracking.trackers import resolve_uri

log = logging.getLogger(__name__)
LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' save_lora_weights default


class WarmStartError(ConfigError):
    """``model.init_from`` names weights that cannot start this run (a ConfigError: bad input)."""


def resolve(init_from: str, dest: str | Path) -> Path:
    """The trained model directory ``init_from`` names (a ``models:/`` URI is downloaded under ``dest``)."""
    if init_from.startswith("models:/"):
        # mlflow: imported only for a registry URI (the champion module imports it)
        from sdpo_core.tracking.champion import TrainedModelUnavailable, fetch_trained

        try:
            return fetch_trained(init_from, dest, resolve_uri())
        except TrainedModelUnavailable as exc:
            raise WarmStartError(f"model.init_from: cannot load {init_from}: {exc}") from None
    path = Path(init_from)
    for candidate in (path, path / "final"):
        if (candidate / "sdpo_model.json").is_file():
            return candidate
    raise WarmStartError(f"model.init_from: {init_from} is neither a models:/ URI, a run directory with final/, "
                         "nor a trained model directory (with sdpo_model.json)")


def _same_base(a: str, b: str) -> bool:
    return a == b or (Path(a).exists() and Path(b).exists() and Path(a).resolve() == Path(b).resolve())


def _check_meta(meta: dict, model_cfg, family, where: str) -> None:
    if meta.get("finetune") != "lora" or model_cfg.finetune != "lora":
        raise WarmStartError(f"model.init_from: {where} is a {meta.get('finetune')!r} fine-tune and this run trains "
                             f"{model_cfg.finetune!r}; a warm start needs LoRA on both sides")
    if not _same_base(str(meta.get("base_model")), model_cfg.pretrained):
        raise WarmStartError(f"model.init_from: {where} was trained on base {meta.get('base_model')!r}, this run "
                             f"on model.pretrained={model_cfg.pretrained!r}")
    if meta.get("family") != family_name(family):
        raise WarmStartError(f"model.init_from: {where} is family {meta.get('family')!r}, this run "
                             f"{family_name(family)!r}")


def load_init_weights(model_dir: Path, family) -> dict[str, torch.Tensor]:
    """The LoRA of ``model_dir`` in peft's naming (the keys of ``lora_param_keys``)."""
    prefix = f"{denoiser_folder(family)}."
    raw = load_file(model_dir / LORA_FILE)
    return convert_unet_state_dict_to_peft({k.removeprefix(prefix): v for k, v in raw.items()})


@contextmanager
def _resolved(init_from: str, shared_dir: str | Path | None) -> Iterator[Path]:
    # under a launcher, into the run dir that every rank reads (see warm_start)
    parent = Path(shared_dir) if shared_dir is not None and ranks.launched() else None
    if parent is not None:
        parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".sdpo-init-", dir=parent) as tmp:
        yield resolve(init_from, tmp)


def warm_start(init_from: str, model_cfg, family, params: dict[str, torch.nn.Parameter],
               shared_dir: str | Path | None = None) -> None:
    """Overwrite the live LoRA ``params`` (``lora_param_keys``) with the weights ``init_from`` names,
    after checking that they fit. Under a launcher rank 0 alone resolves ``init_from`` (the only
    process that talks to MLflow), downloading a ``models:/`` URI under ``shared_dir`` (the run dir,
    which every rank sees); every rank then reads the weights from there."""
    with ranks.from_main_process(lambda: _resolved(init_from, shared_dir)) as model_dir:
        _check_meta(read_model_meta(model_dir), model_cfg, family, init_from)
        weights = load_init_weights(model_dir, family)
    if set(weights) != set(params):
        extra, missing = sorted(set(weights) - set(params)), sorted(set(params) - set(weights))
        raise WarmStartError(f"model.init_from: {init_from} adapts other modules than this run "
                             f"(model.lora_target_modules): {len(missing)} weight(s) missing (e.g. {missing[:1]}), "
                             f"{len(extra)} extra (e.g. {extra[:1]})")
    for key, p in params.items():
        if tuple(weights[key].shape) != tuple(p.shape):
            raise WarmStartError(f"model.init_from: {init_from} has LoRA rank {min(weights[key].shape)} at {key}, "
                                 f"this run model.lora_rank={model_cfg.lora_rank} (shape {tuple(p.shape)})")
    with torch.no_grad():
        for key, p in params.items():
            p.copy_(weights[key].to(dtype=p.dtype, device=p.device))
    log.info("warm start: the LoRA starts from %s (%d tensors)", init_from, len(params))
