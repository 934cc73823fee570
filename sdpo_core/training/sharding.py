"""Sharded training (FSDP2 through accelerate's FSDP plugin): everything that reads or writes the
denoiser's state when its parameters are split over the processes.

FSDP is turned on by the launcher, as accelerate users expect: ``accelerate launch --config_file
configs/accelerate/fsdp_8gpu.yaml sdpo train ...`` (or ``--use_fsdp --fsdp_version 2``) sets the
environment that ``Accelerator()`` reads, and the same ``sdpo train`` runs unsharded (DDP) or sharded
depending on how it was started; no config key can disagree with the launcher. After
``accelerator.prepare`` every parameter of the denoiser is a DTensor holding 1/N of it, so:

- the trained parameters are read from the prepared module (``trainable_parameters``);
- a checkpoint's trained weights and optimizer state are written by every process, each its own
  shard, with torch's distributed checkpoint (``write_shards`` -> ``epoch_NNNN/sharded/``). Only the
  trained weights are saved (a LoRA's megabytes, not the frozen base); ``load_sharded`` reads them
  back into the sharded module (also with another number of processes: DCP reshards on load);
- the trained weights are gathered whole on the main process (``gather_trainable``) for ``final/``.

DCP's ``.metadata`` index is a pickle that torch writes and reads itself; the checkpoint's manifest
(sha256 of every file) is verified before it is opened. Tensors and the optimizer's other values load
with ``weights_only``.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from accelerate import Accelerator
from accelerate.utils import DistributedType, gather_object
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from sdpo_core.config import ConfigError
from sdpo_core.training import checkpoint as ckpt
from sdpo_core.training.nonfinite import nonfinite_names

log = logging.getLogger(__name__)
# the trained weights only: a LoRA checkpoint stays the adapter's size
_TRAINED = StateDictOptions(ignore_frozen_params=True)


def is_sharded(acc: Accelerator) -> bool:
    """True when the launcher turned FSDP on (``accelerate launch`` with an FSDP config)."""
    return acc.distributed_type == DistributedType.FSDP


def check_supported(acc: Accelerator) -> None:
    """FSDP2 only: FSDP1 flattens parameters, which a LoRA's mix of frozen and trained weights needs
    ``use_orig_params`` for and which the state functions here do not read. An FSDP launch that
    accelerate runs unsharded (it shards on GPUs and other accelerators only, not on the CPU) is said."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and not is_sharded(acc):
        log.warning("the launcher asked for FSDP, but accelerate runs %s here (FSDP needs GPUs): the denoiser is "
                    "not sharded and checkpoints are written unsharded", acc.distributed_type.value)
    if is_sharded(acc) and not acc.is_fsdp2:
        raise ConfigError(
            "the accelerate config asks for FSDP version 1; sdpo trains with FSDP2: set `fsdp_version: 2` in "
            "its fsdp_config (as configs/accelerate/fsdp_8gpu.yaml does) or pass `--fsdp_version 2`"
        )


def check_weight_copies(sharded: bool, names: list[str]) -> None:
    """Refuse copies of the trained weights (NFT's old policy, a KL reference, the EMA) under FSDP: they are
    kept and checkpointed whole by the main process, and a sharded process holds only its shard."""
    if names and sharded:
        raise ConfigError(
            f"copies of the trained weights ({', '.join(names)}: train.method=nft, train.kl_beta > 0 or "
            "train.ema_decay) are not supported under FSDP yet: train without FSDP (DDP or one GPU), or use "
            "train.method sdpo/ddpo/grpo with train.kl_beta=0 and no train.ema_decay"
        )


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The trained parameters of the module as prepared (FSDP replaces them with sharded ones)."""
    return [p for p in model.parameters() if p.requires_grad]


def _optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    # accelerate's wrapper steps through its gradient state: DCP initialises the state with a step of
    # the torch optimizer itself
    return getattr(optimizer, "optimizer", optimizer)


def gather_trainable(model: torch.nn.Module) -> dict[str, Any]:
    """The trained weights of the sharded ``model`` whole, in its state-dict naming, on the main
    process's CPU ({} on the others). A collective: every process calls it."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    return get_model_state_dict(model, options=options)


def nonfinite_shards(weights: dict[str, Any], acc: Accelerator) -> list[str]:
    """Names of the trained tensors holding NaN or inf in any process's shard (a collective)."""
    local = nonfinite_names({k: v.to_local() if isinstance(v, DTensor) else v for k, v in weights.items()})
    return sorted(set(gather_object(local)))


def save_sharded(directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 acc: Accelerator) -> list[str]:
    """Every process writes its shard of the trained weights and optimizer state to ``directory``
    (DCP). Returns the names of non-finite weights instead, writing nothing, if there are any."""
    weights = get_model_state_dict(model, options=_TRAINED)
    bad = nonfinite_shards(weights, acc)
    if bad:
        return bad
    state = {"model": weights, "optimizer": get_optimizer_state_dict(model, _optimizer(optimizer), options=_TRAINED)}
    dcp.save(state, checkpoint_id=directory)
    return []


def load_sharded(directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load ``save_sharded``'s files into the prepared ``model`` and ``optimizer`` (every process)."""
    opt = _optimizer(optimizer)
    # templates in this run's layout (the optimizer's state created by a zero step): DCP fills them
    state: dict[str, Any] = {"model": get_model_state_dict(model, options=_TRAINED),
                             "optimizer": get_optimizer_state_dict(model, opt, options=_TRAINED)}
    dcp.load(state, checkpoint_id=directory)
    set_model_state_dict(model, state["model"], options=StateDictOptions(ignore_frozen_params=True, strict=False))
    set_optimizer_state_dict(model, opt, state["optimizer"], options=_TRAINED)


def write_shards(run_dir: Path, epoch: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 acc: Accelerator) -> None:
    """Every process writes its shards into ``epoch_NNNN.tmp/sharded`` (emptied first by the main
    process); the main process then completes the checkpoint (``CheckpointState(sharded=True)``).
    Raises CheckpointWriteError in every process, keeping nothing, when a weight is not finite."""
    path = Path(run_dir) / "checkpoints" / f"{ckpt.PREFIX}{epoch:04d}.tmp" / ckpt.SHARDED_DIR
    if acc.is_main_process:
        if path.parent.exists():  # what a write killed earlier left
            shutil.rmtree(path.parent)
        path.mkdir(parents=True)
    acc.wait_for_everyone()
    bad = save_sharded(path, model, optimizer, acc)
    if bad:  # the same names in every process: all of them raise
        if acc.is_main_process:
            shutil.rmtree(path.parent, ignore_errors=True)
        raise ckpt.CheckpointWriteError(
            f"checkpoint {ckpt.PREFIX}{epoch:04d} was not written: {len(bad)} weight tensor(s) hold NaN or infinite "
            f"values ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}); the last good checkpoint is "
            f"{ckpt.latest_checkpoint(run_dir)}")


def unsharded_copy(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A plain (unsharded) module of ``model``'s class and config holding ``weights`` (its whole state
    dict, e.g. ``gather_trainable`` of a full fine-tune), for ``save_pretrained``; built on the meta
    device, so its memory is ``weights``' own."""
    # fully_shard swaps the module's class for a subclass of FSDPModule and it: save that class
    cls: Any = next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))
    with torch.device("meta"):
        plain = cls.from_config(model.config)
    plain.load_state_dict(weights, assign=True)
    return plain
