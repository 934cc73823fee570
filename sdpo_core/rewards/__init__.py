"""Reward registry: a name (or ``module:function``) -> reward function.

A reward function takes images in [0, 1] of shape (N, 3, H, W) and N prompts and returns (N,)
float32 scores, higher is better. Factories are registered with :func:`register_reward` and
called as ``factory(device=..., dtype=..., **options)`` where ``options`` come from the config's
``reward.options``; a factory that declares a ``model_dir`` parameter also gets the pipeline's base
model directory (``model.pretrained``), where the digits rewards find their classifier.

The registry proper is ``sdpo_core.rewards.registry`` (what reward modules import); this package
adds name lookup and registers the built-in and the digits rewards.

A reward may also expose ``last_components: dict[str, torch.Tensor]`` (each (N,) float32, the
parts of its last call; ``combine`` does) for the trainer to log.
"""

from __future__ import annotations

import difflib
from typing import Any

import torch

# imported for what they register (the built-in rewards and the digits rewards); both import only
# their sibling sdpo_core.rewards.registry, never this package's names
from sdpo_core.rewards import builtin, digits  # noqa: F401
from sdpo_core.rewards.registry import (
    REGISTRY,
    Factory,
    RewardError,
    RewardFn,
    RewardSpec,
    call_factory,
    check_rewards,
    import_callable,
    register_reward,
)

__all__ = [
    "REGISTRY",
    "Factory",
    "RewardError",
    "RewardFn",
    "RewardSpec",
    "available_rewards",
    "build_reward",
    "call_factory",
    "check_rewards",
    "register_reward",
    "validate_reward_name",
]


def validate_reward_name(name: str) -> None:
    """Raise RewardError unless ``name`` is registered or an importable ``module:function``."""
    if ":" in name:
        import_callable(name)
    elif name not in REGISTRY:
        close = difflib.get_close_matches(name, list(REGISTRY), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise RewardError(f"unknown reward '{name}'{hint} (registered: {', '.join(sorted(REGISTRY))})")


def build_reward(
    name: str,
    options: dict[str, Any] | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    model_dir: str | None = None,
) -> RewardFn:
    """Build the reward function ``name`` (registry name or ``module:function``); ``model_dir`` is
    the base model directory (``model.pretrained``), given to factories that declare it."""
    validate_reward_name(name)
    options = dict(options or {})
    if ":" in name:
        fn = import_callable(name)
        return fn(**options) if options else fn  # options make it a factory
    return call_factory(name, REGISTRY[name].factory, device, dtype, options, model_dir)



def available_rewards() -> dict[str, RewardSpec]:
    return dict(sorted(REGISTRY.items()))
