"""Reward registry: a name (or ``module:function``) -> reward function.

A reward function takes images in [0, 1] of shape (N, 3, H, W) and N prompts and returns (N,)
float32 scores, higher is better. Factories are registered with :func:`register_reward` and
called as ``factory(device=..., dtype=..., **options)`` where ``options`` come from the config's
``reward.options``.

A reward may also expose ``last_components: dict[str, torch.Tensor]`` (each (N,) float32, the
parts of its last call; ``combine`` does) for the trainer to log.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
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
    """``module:function`` (or ``module:Class.attr``) -> the callable, or a RewardError saying what is wrong."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr or ":" in attr:
        raise RewardError(f"reward '{spec}': expected 'module:function' (e.g. 'my_pkg.rewards:score')")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise RewardError(
            f"reward '{spec}': cannot import module '{module_name}' ({exc}); is it installed or on PYTHONPATH?"
        ) from exc
    except Exception as exc:  # the user's module raised while importing: say so, with its error
        raise RewardError(
            f"reward '{spec}': importing module '{module_name}' failed: {type(exc).__name__}: {exc}"
        ) from exc
    fn: Any = module
    for part in attr.split("."):
        if not hasattr(fn, part):
            names = [n for n in dir(fn) if not n.startswith("_")]
            close = difflib.get_close_matches(part, names, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise RewardError(f"reward '{spec}': module '{module_name}' has no attribute '{attr}'{hint}")
        fn = getattr(fn, part)
    if not callable(fn):
        raise RewardError(
            f"reward '{spec}': '{attr}' is a {type(fn).__name__}, not a callable; point it at a function "
            "taking (images, prompts)"
        )
    return fn


def call_factory(name: str, factory: Factory, device: Any, dtype: Any, options: dict[str, Any]) -> RewardFn:
    """``factory(device=, dtype=, **options)``, with unknown or missing options as a RewardError
    that lists the accepted ones (instead of Python's bare TypeError)."""
    try:
        inspect.signature(factory).bind(device=device, dtype=dtype, **options)
    except TypeError as exc:
        params = inspect.signature(factory).parameters
        accepted = [
            p for p in params if p not in ("device", "dtype") and params[p].kind is not params[p].VAR_KEYWORD
        ]
        raise RewardError(
            f"reward '{name}': bad options {sorted(options)}: {exc}; accepted: {accepted}"
        ) from exc
    except ValueError:  # builtins without a signature: let the call speak for itself
        pass
    return factory(device=device, dtype=dtype, **options)


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
    name: str,
    options: dict[str, Any] | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> RewardFn:
    """Build the reward function ``name`` (registry name or ``module:function``)."""
    validate_reward_name(name)
    options = dict(options or {})
    if ":" in name:
        fn = _import_callable(name)
        return fn(**options) if options else fn  # options make it a factory
    return call_factory(name, REGISTRY[name].factory, device, dtype, options)


def check_rewards(name: str, values: Any, n: int) -> torch.Tensor:
    """Guard: (n,) finite floating values, else RewardError naming the reward and the problem."""
    if not isinstance(values, torch.Tensor):
        raise RewardError(
            f"reward '{name}' returned {type(values).__name__}, expected a torch.Tensor of shape ({n},)"
        )
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
        from sdpo_core.tiny import digits  # noqa: F401  (digit_alignment rewards)


def available_rewards() -> dict[str, RewardSpec]:
    _load_builtins()
    return dict(sorted(REGISTRY.items()))
