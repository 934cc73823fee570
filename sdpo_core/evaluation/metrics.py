"""Evaluation metrics beside the reward, chosen by name (``evaluate.metrics`` in the config).

A metric takes images in [0, 1] (N, 3, H, W), their N prompts and ``group`` (N,) long ids that
mark samples of the same prompt, and returns one float. Modules register theirs on import. A metric
that declares a ``model_dir`` keyword is given the base model directory (``model.pretrained``), as
reward factories are (``digit_accuracy`` finds its classifier there).
"""

from __future__ import annotations

import functools
import importlib
import inspect
from collections.abc import Callable

import torch

MetricFn = Callable[[torch.Tensor, list[str], torch.Tensor], float]
METRICS: dict[str, tuple[MetricFn, str]] = {}
# modules imported before a metric is looked up (they register on import)
_PROVIDERS = ["sdpo_core.evaluation.metrics", "sdpo_core.tiny.digits"]


def register_metric(name: str, description: str) -> Callable[[MetricFn], MetricFn]:
    def deco(fn: MetricFn) -> MetricFn:
        METRICS[name] = (fn, description)
        return fn

    return deco


def get_metric(name: str, model_dir: str | None = None) -> MetricFn:
    """The metric ``name``, bound to ``model_dir`` when it declares that keyword."""
    for mod in _PROVIDERS:
        try:
            importlib.import_module(mod)
        except ImportError:
            pass
    if name not in METRICS:
        raise KeyError(f"unknown evaluation metric '{name}' (known: {', '.join(sorted(METRICS))})")
    fn: Callable[..., float] = METRICS[name][0]
    if "model_dir" in inspect.signature(fn).parameters:
        return functools.partial(fn, model_dir=model_dir)
    return fn
