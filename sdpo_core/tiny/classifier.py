"""Training the digits classifier that the digits rewards and metrics read (built once, cached
in the base model directory's ``classifier/``), deterministic for a seed whatever the core count.

The classifier itself, its input and its loading live with the rewards (:mod:`sdpo_core.rewards.digits`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from sdpo_core.rewards.digits import (
    CLASSIFIER_SEED,
    IMAGE_SIZE,
    SPLIT_SEED,
    DigitClassifier,
    classifier_input,
    load_classifier,
    load_digit_images,
)
from sdpo_core.tiny.repro import fixed_threads


def _augment(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random shift (up to 2 px), rotation (up to 10 degrees), scale (0.9-1.1) and contrast
    (0.7-1.2): (N, 3, 32, 32) -> same shape.

    Generated digits are less centred and less crisp than the data; this keeps the classifier
    from reading those differences as a different digit.
    """
    n = images.shape[0]
    u = torch.rand(5, n, generator=gen) * 2 - 1  # uniform in [-1, 1]
    angle, scale = u[0] * torch.pi / 18, 1 + 0.1 * u[1]
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    shift = u[2:4] * 4 / IMAGE_SIZE  # 2 px in grid units (the image spans 2)
    theta = torch.stack([torch.stack([cos, -sin, shift[0]], 1), torch.stack([sin, cos, shift[1]], 1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    out = F.grid_sample(images, grid, align_corners=False)
    return (out * (0.95 + 0.25 * u[4]).view(n, 1, 1, 1)).clamp(0, 1)


@torch.no_grad()
def classifier_accuracy(model: DigitClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of (N, 3, H, W) images whose argmax class equals labels (N,)."""
    model.eval()
    return (model(classifier_input(images)).argmax(1) == labels).float().mean().item()


def train_classifier(
    seed: int = CLASSIFIER_SEED, epochs: int = 120, batch_size: int = 64
) -> tuple[DigitClassifier, float]:
    """Train on the held-out split's training part (deterministic for ``seed``); return the model
    and its accuracy on the held-out split's test part, which it never saw."""
    images, labels = load_digit_images("classifier_train")
    torch.manual_seed(seed)  # initial weights and dropout
    gen = torch.Generator().manual_seed(seed)  # batches and augmentation
    model = DigitClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=3e-3, total_steps=epochs * -(-len(labels) // batch_size)
    )
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(labels), generator=gen).split(batch_size):
            logits = model(classifier_input(_augment(images[idx], gen)))
            loss = F.cross_entropy(logits, labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    return model, classifier_accuracy(model, *load_digit_images("classifier_test"))


def save_classifier(model: DigitClassifier, path: str | Path, info: dict) -> Path:
    """Write ``model.safetensors`` + ``config.json`` into ``path`` atomically (temp dir, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache is shared like the model beside it
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp / "model.safetensors")
    config = {"width": model.width, "hidden": model.hidden, **info}
    (tmp / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    try:
        os.replace(tmp, path)
    except OSError:  # another process saved the same (deterministic) classifier first
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def load_or_train_classifier(path: str | Path, seed: int = CLASSIFIER_SEED) -> tuple[DigitClassifier, dict]:
    """The classifier cached at ``path``, trained and saved there first if it is missing."""
    path = Path(path)
    if not (path / "model.safetensors").is_file():
        with fixed_threads():  # the same judge whatever the core count
            model, acc = train_classifier(seed)
        info = {
            "seed": seed,
            "split_seed": SPLIT_SEED,
            "test_accuracy": acc,
            "diffusion_split_accuracy": classifier_accuracy(model, *load_digit_images("diffusion")),
        }
        save_classifier(model, path, info)
    return load_classifier(path)
