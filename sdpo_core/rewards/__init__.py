"""Reward registry: a name (or ``module:function``) -> reward function.

A reward function takes images in [0, 1] of shape (N, 3, H, W) and N prompts and returns (N,)
float32 scores, higher is better. Factories are registered with :func:`register_reward` and
called as ``factory(device=..., dtype=..., **options)`` where ``options`` come from the config's
``reward.options``.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

RewardFn = Callable[[torch.Tensor, list[str]], torch.Tensor]
Factory = Callable[..., RewardFn]


class RewardError(RuntimeError):
    """A reward could not be built or returned bad values."""


@dataclass(frozen=True)
class RewardSpec:
    name: str
    factory: Factory
    description: str
    value_range: str


REGISTRY: dict[str, RewardSpec] = {}


def register_reward(name: str, description: str, value_range: str) -> Callable[[Factory], Factory]:
    def deco(factory: Factory) -> Factory:
        REGISTRY[name] = RewardSpec(name, factory, description, value_range)
        return factory

    return deco


def _import_callable(spec: str) -> Callable[..., Any]:
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise RewardError(f"reward '{spec}': cannot import module '{module_name}': {exc}") from exc
    fn = getattr(module, attr, None)
    if fn is None:
        raise RewardError(f"reward '{spec}': module '{module_name}' has no attribute '{attr}'")
    if not callable(fn):
        raise RewardError(f"reward '{spec}': '{attr}' is not callable")
    return fn


def validate_reward_name(name: str) -> None:
    """Raise RewardError unless ``name`` is registered or an importable ``module:function``."""
    _load_builtins()
    if ":" in name:
        _import_callable(name)
    elif name not in REGISTRY:
        close = difflib.get_close_matches(name, list(REGISTRY), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise RewardError(f"unknown reward '{name}'{hint} (registered: {', '.join(sorted(REGISTRY))})")


def build_reward(
    name: str, options: dict[str, Any] | None = None, device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> RewardFn:
    """Build the reward function ``name`` (registry name or ``module:function``)."""
    validate_reward_name(name)
    options = dict(options or {})
    if ":" in name:
        fn = _import_callable(name)
        return fn(**options) if options else fn  # options make it a factory
    return REGISTRY[name].factory(device=device, dtype=dtype, **options)


def check_rewards(name: str, values: Any, n: int) -> torch.Tensor:
    """Guard: (n,) finite floating values, else RewardError naming the reward and the problem."""
    if not isinstance(values, torch.Tensor):
        raise RewardError(f"reward '{name}' returned {type(values).__name__}, expected a torch.Tensor of shape ({n},)")
    if values.shape != (n,):
        raise RewardError(f"reward '{name}' returned shape {tuple(values.shape)}, expected ({n},)")
    if not values.is_floating_point():
        raise RewardError(f"reward '{name}' returned dtype {values.dtype}, expected a floating dtype")
    bad = ~torch.isfinite(values)
    if bad.any():
        idx = bad.nonzero().flatten().tolist()[:8]
        raise RewardError(
            f"reward '{name}' returned non-finite values at items {idx}: {values[bad][:8].tolist()}"
        )
    return values.float()


_BUILTINS_LOADED = False


def _load_builtins() -> None:
    global _BUILTINS_LOADED
    if not _BUILTINS_LOADED:
        _BUILTINS_LOADED = True
        from sdpo_core.rewards import builtin  # noqa: F401  (registers on import)


def available_rewards() -> dict[str, RewardSpec]:
    _load_builtins()
    return dict(sorted(REGISTRY.items()))
