"""User rewards (``module:function``) for tests: importable because tests/ is on sys.path."""

import torch

CALLS = {"n": 0}


def brightness(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """Mean pixel value: (N, 3, H, W) -> (N,)."""
    return images.float().mean(dim=(1, 2, 3))


def nan_after_first_epoch(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """Good values on the first call, a NaN from the second call on (one call per batch)."""
    CALLS["n"] += 1
    values = images.float().mean(dim=(1, 2, 3))
    if CALLS["n"] > 1:
        values[0] = float("nan")
    return values
