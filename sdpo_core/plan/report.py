"""What ``sdpo plan`` prints and ``sdpo train`` refuses: a budget against a GPU's memory, with what to
change (each change with the peak it would give), and the table of the budget's parts."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from sdpo_core.config import Config
from sdpo_core.plan.budget import Budget, DoesNotFit, GiB, PlanError, plan_budget
from sdpo_core.plan.sharding import launch_shards
from sdpo_core.training.scoring import DECODE_CHUNK

FSDP_CONFIG = "configs/accelerate/fsdp_8gpu.yaml"
MAX_SHARDS = 64


def _gib(n: float) -> str:
    return f"~{n / GiB:.1f} GiB"


def alternatives(b: Budget, gpu_bytes: int) -> list[str]:
    """What to change, each with the per-GPU peak it would give (changes of the model's dtype are
    listed without one: they need another plan); a change that would not lower the peak is left out."""
    out = []
    changes: list[tuple[str, bool, dict[str, Any]]] = [
        ("model.gradient_checkpointing=true", not b.checkpointing,
         dict(activations=b.activations_other, activations_other=b.activations, checkpointing=True)),
        ("model.cache_prompt_embeddings=true, which frees the text encoders", not b.text_freed,
         dict(text_freed=b.text_bytes)),
        ("train.batch_size=1 with more train.gradient_accumulation_steps", b.micro_batch > b.item_rows,
         dict(activations=b.activations * b.item_rows // b.micro_batch, micro_batch=b.item_rows)),
    ]
    for what, applies, fields in changes:
        peak = dataclasses.replace(b, **fields).peak if applies else b.peak
        if peak < b.peak:
            out.append(f"{what} ({_gib(peak)})")
    fits = next((n for n in (2**i for i in range(1, 7)) if n > b.shards
                 and dataclasses.replace(b, shards=n).peak <= gpu_bytes), None)
    if fits:
        out.append(f"FSDP over {fits} GPUs, which shards the denoiser's weights, gradients and AdamW state "
                   f"({_gib(dataclasses.replace(b, shards=fits).peak)} per GPU; accelerate launch --config_file "
                   f"{FSDP_CONFIG} --num_processes {fits} ...)")
    elif b.shards < MAX_SHARDS:
        out.append(f"FSDP alone does not make it fit ({_gib(dataclasses.replace(b, shards=MAX_SHARDS).peak)} per GPU "
                   f"on {MAX_SHARDS} GPUs: the text encoders, the VAE and the activations are not sharded)")
    if b.finetune == "full":
        out.append("model.finetune=lora (trains ~1% of the weights: their gradients and AdamW state shrink to "
                   "megabytes, and the frozen denoiser is kept in model.mixed_precision)")
    if b.mixed_precision == "no":
        out.append("model.mixed_precision=bf16 (halves the frozen weights)")
    return out


def refusal(budget: Budget, gpu_bytes: int) -> str | None:
    """Why the budget does not fit ``gpu_bytes`` per GPU and what to change, or None when it fits."""
    if budget.peak <= gpu_bytes:
        return None
    how = f" (FSDP over {budget.shards} processes)" if budget.shards > 1 else ""
    return (f"pipeline '{budget.pipeline}' needs {_gib(budget.peak)} per GPU{how}, more than the "
            f"{gpu_bytes / GiB:.1f} GiB there; try: " + "; ".join(alternatives(budget, gpu_bytes)))


def gpu_memory() -> int | None:
    """Bytes of memory of CUDA device 0, or None without CUDA."""
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(0).total_memory


def refuse_if_too_big(cfg: Config, name: str, total: int | None = None, shards: int | None = None) -> None:
    """``sdpo train``'s check: DoesNotFit (exit 2) when the budget exceeds ``total`` bytes (default:
    the detected GPU's), sharded over ``shards`` processes (default: as launched, ``launch_shards``);
    nothing without CUDA (a CPU run has no such limit) or without configs to read (the loader then
    reports the model)."""
    total = total or gpu_memory()
    if total is None:
        return
    shards = launch_shards() if shards is None else shards
    try:
        budget = plan_budget(cfg, name, shards)
    except PlanError:
        return  # no configs to read before the loader runs: loading itself reports the model
    why = refusal(budget, total)
    if why:
        sharded = f" --gpus {shards} --fsdp" if shards > 1 else ""
        raise DoesNotFit(why + f" (see `sdpo plan --pipeline {name}{sharded}`)")


def _size(n: int) -> str:
    return f"{n / GiB:8.2f} GiB" if n >= GiB / 10 else f"{n / 2**20:8.1f} MiB"


def format_budget(b: Budget, gpu_bytes: int | None) -> str:
    """The table ``sdpo plan`` prints."""
    how = f"; the denoiser sharded with FSDP over {b.shards} processes" if b.shards > 1 else ""
    rows = [f"memory plan for '{b.pipeline}' (per GPU{how}; GiB = 2^30 bytes)"]
    share = f" / {b.shards}" if b.shards > 1 else ""

    def row(label: str, n: int) -> None:
        rows.append(f"  {label:<62} {_size(n)}")

    for k, (n, d) in b.params.items():
        row(f"weights {k:<15} {n:>15,} params  {d}{share if k == b.denoiser else ''}",
            math.ceil(b.weights[k] / b.shards) if k == b.denoiser else b.weights[k])
    if b.shards > 1:
        largest, root = b.unit_params
        row(f"  FSDP blocks gathered to run: root {root:,} + 2 x {largest:,} params", b.gathered)
    if b.text_freed:
        row("text encoders freed (model.cache_prompt_embeddings)", -b.text_freed)
    what = "LoRA weights + grads + AdamW m, v" if b.finetune == "lora" else "grads + AdamW m, v"
    row(f"trained {b.trainable:,} params: {what} (float32){share}", math.ceil(b.optimizer / b.shards))
    on, off = ("with", "without") if b.checkpointing else ("without", "with")
    row(f"activations, micro-batch {b.micro_batch}, {on} gradient checkpointing", b.activations)
    row(f"  ({off} gradient checkpointing)", b.activations_other)
    row(f"VAE decode of up to {DECODE_CHUNK} images (estimate)", b.decode)
    row("peak", b.peak)
    if gpu_bytes:
        rows.append("  " + (refusal(b, gpu_bytes) or f"fits in {gpu_bytes / GiB:.1f} GiB"))
    rows.append("  (predicted from configs, not measured; CUDA context and allocator overhead not included)")
    return "\n".join(rows)
