"""The reward registry itself: ``register_reward``, the factory call and the value guard.

Modules that provide rewards (``sdpo_core.rewards.builtin``, ``sdpo_core.rewards.digits``, a user's
own) import this module, not the names of the ``sdpo_core.rewards`` package, which imports them
to register them: the import graph stays one-way (tests/unit/test_structure.py).
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
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
# A factory that declares this parameter is given the pipeline's base model directory
# (``model.pretrained``): rewards whose weights ship with the model (the digits classifier) find
# them there, whatever the working directory.
MODEL_DIR = "model_dir"
#: who may name ``module:function`` rewards: an environment variable and an entry-point group
ALLOWED_MODULES_ENV = "SDPO_ALLOWED_REWARD_MODULES"
ENTRY_POINT_GROUP = "sdpo.rewards"


def register_reward(name: str, description: str, value_range: str) -> Callable[[Factory], Factory]:
    def deco(factory: Factory) -> Factory:
        REGISTRY[name] = RewardSpec(name, factory, description, value_range)
        return factory

    return deco


def allowed_reward_modules() -> list[str]:
    """The modules whose functions a ``module:function`` reward may name (their submodules too): those
    in ``SDPO_ALLOWED_REWARD_MODULES`` (comma-separated) and those of installed ``sdpo.rewards`` entry
    points. The operator's choice, not a config key: neither ``--set`` nor a flow run's overrides can
    widen it, so a config cannot run ``os:system`` on the worker."""
    named = (m.strip() for m in os.environ.get(ALLOWED_MODULES_ENV, "").split(","))
    plugins = (ep.module for ep in entry_points(group=ENTRY_POINT_GROUP))
    return sorted({m for m in (*named, *plugins) if m})


def check_allowed(spec: str, module_name: str) -> None:
    """RewardError unless the operator allows ``module_name`` (checked before it is imported)."""
    allowed = allowed_reward_modules()
    if not any(module_name == m or module_name.startswith(m + ".") for m in allowed):
        raise RewardError(
            f"reward '{spec}': module '{module_name}' is not allowed to provide rewards (allowed: "
            f"{', '.join(allowed) or 'none'}); the operator allows it with {ALLOWED_MODULES_ENV}={module_name} "
            f"(comma-separated) or by installing it with an '{ENTRY_POINT_GROUP}' entry point"
        )


def import_callable(spec: str) -> Callable[..., Any]:
    """``module:function`` (or ``module:Class.attr``) of an allowed module -> the callable, or a
    RewardError saying what is wrong."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr or ":" in attr:
        raise RewardError(f"reward '{spec}': expected 'module:function' (e.g. 'my_pkg.rewards:score')")
    check_allowed(spec, module_name)
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


def takes_model_dir(fn: Callable[..., Any]) -> bool:
    """Whether ``fn`` declares a ``model_dir`` parameter (then it is given the base model directory)."""
    try:
        return MODEL_DIR in inspect.signature(fn).parameters
    except (TypeError, ValueError):  # builtins without a signature
        return False


def call_factory(
    name: str,
    factory: Factory,
    device: Any,
    dtype: Any,
    options: dict[str, Any],
    model_dir: str | None = None,
) -> RewardFn:
    """``factory(device=, dtype=, **options)``, plus ``model_dir=`` when the factory declares that
    parameter, with unknown or missing options as a RewardError that lists the accepted ones
    (instead of Python's bare TypeError)."""
    if MODEL_DIR in options:
        raise RewardError(
            f"reward '{name}': '{MODEL_DIR}' is not an option: it is the pipeline's model.pretrained"
        )
    kwargs = {"device": device, "dtype": dtype, **options}
    if takes_model_dir(factory):
        kwargs[MODEL_DIR] = model_dir
    try:
        inspect.signature(factory).bind(**kwargs)
    except TypeError as exc:
        params = inspect.signature(factory).parameters
        accepted = [
            p
            for p in params
            if p not in ("device", "dtype", MODEL_DIR) and params[p].kind is not params[p].VAR_KEYWORD
        ]
        raise RewardError(
            f"reward '{name}': bad options {sorted(options)}: {exc}; accepted: {accepted}"
        ) from exc
    except ValueError:  # builtins without a signature: let the call speak for itself
        pass
    return factory(**kwargs)


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
