"""What FSDP changes in the memory budget (``sdpo plan --gpus N --fsdp``, and ``sdpo train`` under an
FSDP ``accelerate launch``).

FSDP divides the denoiser's weights, its gradients and the AdamW state by the number of processes.
What it adds back: the units it gathers whole to run them. accelerate's ``TRANSFORMER_BASED_WRAP``
(configs/accelerate/fsdp_8gpu.yaml) makes a unit of every module of the denoiser's
``_no_split_modules`` classes (its transformer / UNet blocks), holding the parameters no unit inside
it holds; the root unit holds the rest and stays gathered from the forward to the end of the backward.
The budget counts the root plus two of the largest unit (the one running and the next one, prefetched)
in the compute dtype, plus, for a full fine-tune, the largest unit's whole float32 gradient before it
is reduce-scattered. The text encoders, the VAE and the activations are not sharded.
"""

from __future__ import annotations

import os

import torch


def fsdp_units(den: torch.nn.Module) -> tuple[int, int]:
    """(parameters of the largest unit, parameters of the root unit) of ``den`` wrapped by its
    ``_no_split_modules`` as accelerate's FSDP2 preparation wraps it (bottom up, the root last)."""
    names = set(getattr(den, "_no_split_modules", None) or ())
    held: set[int] = set()
    largest = 0
    for module in reversed(list(den.modules())):  # every module after all of its descendants
        if module is den or type(module).__name__ not in names:
            continue
        own = [p for p in module.parameters() if id(p) not in held]
        held.update(id(p) for p in own)
        largest = max(largest, sum(p.numel() for p in own))
    root = sum(p.numel() for p in den.parameters() if id(p) not in held)
    return largest, root


def launch_shards(environ: dict[str, str] | None = None) -> int:
    """The processes this launch shards the denoiser over: ``WORLD_SIZE`` under an FSDP ``accelerate
    launch`` (which sets ``ACCELERATE_USE_FSDP=true``), else 1."""
    env = os.environ if environ is None else environ
    if env.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return 1
    return max(1, int(env.get("WORLD_SIZE", "1")))
