"""Copies of the trained weights kept beside the live ones: a method's old policy, the KL reference, the EMA.

``PolicyWeights`` holds named copies ("snapshots") of the trainable parameters, on their device, all
taken from the weights training starts from (before a checkpoint restores the copies it saved):

    weights = PolicyWeights(params, method.policies(), ema_decay=cfg.train.ema_decay)
    with weights.use("old"):           # the old policy's weights are the live ones inside the block
        rollout = sample_epoch(...)
    weights.blend("old", 0.5)          # old <- old + 0.5 (live - old)
    weights.after_optimizer_step(n)    # the EMA's step

``use`` copies a snapshot into the live parameters in place (the same Parameter objects, so the
optimizer, accelerate's wrappers and torch.compile see nothing change) and the live values back on
the way out, bit for bit (they wait in one more copy, allocated on the first swap). The copies bump
the parameters' autograd versions: a backward through a graph built while a copy was swapped in
fails loudly rather than computing a gradient of the wrong weights. For a LoRA the copies are a few
MB; a full fine-tune holds one denoiser copy per snapshot, plus that one.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager

import torch

from sdpo_core.methods.method import CURRENT
from sdpo_core.training.checkpoint import ResumeError

EMA = "ema"


def ema_decay(decay: float, step: int) -> float:
    """The EMA's decay at optimizer step ``step`` (1 = the first): min(decay, (1 + step) / (10 + step)), a
    warm-up that lets the EMA follow the early weights (DiffusionNFT's ``EMAModuleWrapper``, as diffusers'
    ``EMAModel`` with its warm-up)."""
    return min(decay, (1 + step) / (10 + step))


class PolicyWeights:
    """Named copies of ``params`` (name -> live trainable parameter): ``names`` and, with ``ema_decay``, "ema"."""

    def __init__(
        self, params: dict[str, torch.nn.Parameter], names: Iterable[str], ema_decay: float | None = None
    ) -> None:
        self.params, self.ema_decay = params, ema_decay
        wanted = list(dict.fromkeys([*names, *([EMA] if ema_decay is not None else [])]))
        self.snapshots = {n: {k: p.detach().clone() for k, p in params.items()} for n in wanted}
        self._live = [p.detach() for p in params.values()]
        # the live weights while a copy is swapped in (allocated on first use: one more copy of them)
        self._aside: list[torch.Tensor] | None = None

    def __contains__(self, name: str) -> bool:
        return name in self.snapshots

    @contextmanager
    def use(self, name: str) -> Iterator[None]:
        """The copy ``name`` as the live weights inside the block (CURRENT: the live weights themselves)."""
        if name == CURRENT:
            yield
            return
        if name not in self.snapshots:
            raise KeyError(f"no copy of the weights named {name!r} is kept (have: {sorted(self.snapshots)})")
        if self._aside is None:
            self._aside = [t.clone() for t in self._live]
        # multi-tensor copies: three kernel launches per swap whatever the number of LoRA tensors
        with torch.no_grad():
            torch._foreach_copy_(self._aside, self._live)
            self._copy_into_live(list(self.snapshots[name].values()))
        try:
            yield
        finally:
            with torch.no_grad():
                self._copy_into_live(self._aside)

    def _copy_into_live(self, tensors: list[torch.Tensor]) -> None:
        # through the Parameters (not .data): their autograd versions move, so a graph built on the other
        # weights cannot be back-propagated silently
        torch._foreach_copy_(list(self.params.values()), tensors)

    def exported(self) -> AbstractContextManager[None]:
        """The weights evaluation and export use: the EMA when it is kept, else the live ones."""
        return self.use(EMA if EMA in self.snapshots else CURRENT)

    @torch.no_grad()
    def blend(self, name: str, weight: float) -> None:
        """Move copy ``name`` toward the live weights: copy <- copy + weight (live - copy)."""
        torch._foreach_lerp_(list(self.snapshots[name].values()), self._live, weight)

    def after_optimizer_step(self, step: int) -> None:
        """The EMA's update after optimizer step ``step`` (1 = the first), if an EMA is kept."""
        if self.ema_decay is not None:
            self.blend(EMA, 1.0 - ema_decay(self.ema_decay, step))

    def state_dict(self) -> dict[str, dict[str, torch.Tensor]]:
        """CPU copies of every snapshot (for a checkpoint)."""
        return {
            n: {k: v.detach().to("cpu", copy=True) for k, v in snap.items()}
            for n, snap in self.snapshots.items()
        }

    def load_state_dict(self, state: dict[str, dict[str, torch.Tensor]], source: str) -> None:
        """Restore every kept snapshot from ``state`` (a checkpoint's); ResumeError naming ``source`` when
        one is missing or does not fit (a copy not kept now is ignored)."""
        for name, snap in self.snapshots.items():
            saved = state.get(name)
            if saved is None or saved.keys() != snap.keys():
                why = "has none" if saved is None else "has one for other weights"
                raise ResumeError(
                    f"{source}: this run keeps a copy of the weights named {name!r} (old policy, KL reference or "
                    f"EMA: train.method, train.kl_beta, train.nft.kl_weight, train.ema_decay) but the checkpoint "
                    f"{why}; resume with the checkpoint's config, or start a new run with another --run-dir"
                )
            for key, value in saved.items():
                snap[key].copy_(value)
