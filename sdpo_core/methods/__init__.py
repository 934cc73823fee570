"""RL methods as strategy objects (see ``method.py``): one file per method, listed in ``METHODS``."""

from __future__ import annotations

from typing import Any

from sdpo_core.methods.ddpo import DDPO
from sdpo_core.methods.grpo import GRPO
from sdpo_core.methods.method import Method
from sdpo_core.methods.nft import NFT
from sdpo_core.methods.sdpo import SDPO

METHODS: dict[str, type[Method]] = {m.name: m for m in (SDPO, DDPO, GRPO, NFT)}


def build_method(train: Any, num_steps: int) -> Method:
    """The strategy for ``train.method`` (the config's Literal, built from ``METHODS``, already
    rejects unknown names)."""
    return METHODS[train.method](train, num_steps)


__all__ = ["METHODS", "Method", "build_method"]
