"""Rewards of the fault tests (``reward_fault_fns:NAME``, served by ``sdpo reward-server`` or given to
``sdpo train`` with tests/faults on PYTHONPATH)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import torch

_calls = 0
_overflow_calls = 0


def dying_brightness(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """Mean pixel value; the server process SIGKILLs itself at call ``SDPO_TEST_DIE_AT`` (a crash
    while it serves a request: the client sees its connection dropped, then nothing listens)."""
    global _calls
    _calls += 1
    if _calls == int(os.environ.get("SDPO_TEST_DIE_AT", "0")):
        os.kill(os.getpid(), signal.SIGKILL)
    return images.float().mean(dim=(1, 2, 3))


def gated_brightness(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """Mean pixel value, once the file ``SDPO_TEST_GATE`` names exists (at most 300 s): a run that
    stays inside its first epoch, holding its run dir, until the test opens the gate."""
    gate = Path(os.environ["SDPO_TEST_GATE"])
    deadline = time.monotonic() + 300
    while not gate.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return images.float().mean(dim=(1, 2, 3))


def overflow_from_third_call(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """Mean pixel value on the first two calls (one per epoch of tiny-random), then 3e38 for every
    image: finite, so check_rewards passes it, but the discounted float32 returns overflow to inf
    and the advantages (inf - inf) and the loss become NaN."""
    global _overflow_calls
    _overflow_calls += 1
    if _overflow_calls > 2:
        return torch.full((len(images),), 3e38)
    return images.float().mean(dim=(1, 2, 3))
