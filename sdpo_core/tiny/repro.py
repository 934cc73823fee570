"""Reproducible CPU builds: the same seed gives the same weights whatever the caller's thread count.

A float32 sum's rounding depends on its order, and CPU kernels (ATen's, oneDNN's, MKL's) split
their reductions by the number of intra-op threads, which PyTorch sets from the core count. One
different bit in the first optimizer step grows over a few thousand steps into a different model
(the digits-tiny base: up to ~0.05 of mean reward), and a different judge (the classifier). The
build therefore runs with a fixed thread count. What still differs between CPUs is their
instruction set (AVX-512 or AVX2 kernels sum in another order, as do MKL's code paths for other
CPU vendors): ``build_info.json`` records it beside the thread count.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

BUILD_THREADS = 2  # the cores of the machines the README's numbers come from


@contextmanager
def fixed_threads(threads: int = BUILD_THREADS) -> Iterator[None]:
    """Run the block with ``threads`` intra-op threads; the caller's count is restored afterwards.

    (On CPU the build's ops are already deterministic run to run at a given thread count: two
    builds give identical bits; ``torch.use_deterministic_algorithms`` changes nothing there.)"""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "unknown")


def build_environment() -> dict:
    """What a build's bits depend on besides its seed and budget (for ``build_info.json``)."""
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu": _cpu_model(),
    }
