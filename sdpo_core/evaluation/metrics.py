"""Evaluation metrics beside the reward, chosen by name (``evaluate.metrics`` in the config).

A metric takes images in [0, 1] (N, 3, H, W), their N prompts and ``group`` (N,) long ids that
mark samples of the same prompt, and returns one float. The metrics live here; another module may
register more with :func:`register_metric` on import. A metric
that declares a ``model_dir`` keyword is given the base model directory (``model.pretrained``), as
reward factories are (``digit_accuracy`` finds its classifier there).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

import torch

from sdpo_core.rewards.digits import (
    classifier_input,
    classifier_path_for,
    get_classifier,
    load_digit_images,
    parse_digit,
    stroke_boldness,
)

MetricFn = Callable[[torch.Tensor, list[str], torch.Tensor], float]
METRICS: dict[str, tuple[MetricFn, str]] = {}


def register_metric(name: str, description: str) -> Callable[[MetricFn], MetricFn]:
    def deco(fn: MetricFn) -> MetricFn:
        METRICS[name] = (fn, description)
        return fn

    return deco


def get_metric(name: str, model_dir: str | None = None) -> MetricFn:
    """The metric ``name``, bound to ``model_dir`` when it declares that keyword."""
    if name not in METRICS:
        raise KeyError(f"unknown evaluation metric '{name}' (known: {', '.join(sorted(METRICS))})")
    fn: Callable[..., float] = METRICS[name][0]
    if "model_dir" in inspect.signature(fn).parameters:
        return functools.partial(fn, model_dir=model_dir)
    return fn


# -------------------------------------------------------------------------- the metrics
@register_metric("digit_accuracy", "fraction of images the digits classifier reads as the prompted digit")
def digit_accuracy(
    images: torch.Tensor, prompts: list[str], group: torch.Tensor | None = None, model_dir: str | None = None
) -> float:
    """(N, 3, H, W) in [0, 1], N prompts -> fraction whose argmax class is the prompted digit
    (the classifier of the base model directory ``model_dir``)."""
    model = get_classifier(classifier_path_for(model_dir, None, "metric 'digit_accuracy'"))
    digits = torch.tensor([parse_digit(p) for p in prompts])
    with torch.no_grad():
        pred = model(classifier_input(images.cpu())).argmax(dim=1)
    return (pred == digits).float().mean().item()


@register_metric("diversity", "mean pairwise RMS pixel distance between samples of the same prompt group")
def diversity(images: torch.Tensor, prompts: list[str] | None, group: torch.Tensor) -> float:
    """(N, 3, H, W) images, (N,) group ids -> mean over groups with >= 2 samples of the mean
    pairwise L2 distance / sqrt(3 H W) (an RMS pixel difference, 0 for identical images).
    NaN when no group has two samples (diversity is undefined there)."""
    flat = images.detach().float().cpu().flatten(1)
    per_group = []
    for g in torch.unique(group.cpu()):
        x = flat[group.cpu() == g]
        if len(x) >= 2:
            # exact differences: the matmul shortcut leaves ~1e-3 between identical images
            dist = torch.cdist(x[None], x[None], compute_mode="donot_use_mm_for_euclid_dist")[0]
            iu = torch.triu_indices(len(x), len(x), offset=1)
            per_group.append(dist[iu[0], iu[1]].mean() / flat.shape[1] ** 0.5)
    return torch.stack(per_group).mean().item() if per_group else float("nan")


@register_metric(
    "boldness", "mean stroke boldness (digit_alignment_bold's preference term, target area 0.45)"
)
def boldness(
    images: torch.Tensor, prompts: list[str] | None = None, group: torch.Tensor | None = None
) -> float:
    """(N, 3, H, W) in [0, 1] -> mean :func:`stroke_boldness` (to see what a bold reward bought)."""
    return stroke_boldness(images).mean().item()


def real_data_diversity(split: str = "heldout") -> float:
    """:func:`diversity` of real digits of ``split`` grouped by class (the reference for a model's)."""
    images, labels = load_digit_images(split)
    return diversity(images, None, labels)
