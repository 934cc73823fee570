"""Non-finite updates: a NaN or infinite loss or gradient never reaches the weights.

Each backward's loss is checked on its device (``observe``: a flag tensor, nothing read by the
host). At an optimizer step the flag and the norm that gradient clipping has just computed are
read once (``skip_update``): a non-finite update is skipped, i.e. no optimizer step, so the weights
and the optimizer state stay as they were and the gradients are dropped. ``train.nonfinite: stop``
(the default) ends the run with ``NonFiniteError`` after ``train.max_nonfinite_steps`` skipped
updates in a row; ``skip`` goes on. The trainer counts them per epoch (``nonfinite/skipped``).

That one read per optimizer step is the only host sync added: every training step already waits
for the device when it copies its batch from the CPU. Under fp16 loss scaling (accelerate's
GradScaler) an overflowing gradient is the scaler's to handle (it skips that step and lowers the
scale, as it is built to); only the loss is checked here. With several processes the decision is
summed over them, so all of them skip (or stop at) the same update.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from accelerate import Accelerator

log = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    """Training stopped on non-finite updates; the weights are still the last finite ones."""

    def __init__(self, epoch: int, update: int, global_step: int, detail: str) -> None:
        super().__init__(detail)
        self.epoch, self.update, self.global_step, self.detail = epoch, update, global_step, detail
        self.checkpoint: Path | None = None  # the last good checkpoint, filled in by the trainer
        self.checkpoint_known = False

    def __str__(self) -> str:
        where = (f"training stopped at epoch {self.epoch}, update {self.update} of the epoch (after optimizer step "
                 f"{self.global_step}): {self.detail}")
        if not self.checkpoint_known:
            return where
        if self.checkpoint is None:
            return f"{where}; no checkpoint was written before it: fix the cause and start again"
        return (f"{where}; the last good checkpoint is {self.checkpoint}: fix the cause (rewards, advantages, "
                "learning rate), then continue from it with --resume, or set train.nonfinite=skip")


def nonfinite_names(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of the tensors holding a NaN or an infinite value (one read from their device)."""
    if not tensors:
        return []
    finite = torch.stack([torch.isfinite(t).all() for t in tensors.values()]).tolist()
    return [name for name, ok in zip(tensors, finite, strict=True) if not ok]


class NonFiniteGuard:
    """Decides, at each optimizer step, whether the update is finite (see the module docstring)."""

    def __init__(self, acc: Accelerator, mode: str, max_consecutive: int) -> None:
        self.acc, self.mode, self.max_consecutive = acc, mode, max_consecutive
        self.bad_loss: torch.Tensor | None = None  # () bool on the device: a loss of this update was non-finite
        self.consecutive = 0  # skipped updates in a row, across epochs
        self.skipped = 0  # skipped updates since reset_epoch

    def reset_epoch(self) -> None:
        self.skipped = 0

    def observe(self, loss: torch.Tensor) -> None:
        """Note one backward's (scalar) loss; nothing is read from the device."""
        bad = ~torch.isfinite(loss.detach())
        self.bad_loss = bad if self.bad_loss is None else self.bad_loss | bad

    def skip_update(self, grad_norm: torch.Tensor, loss: torch.Tensor, epoch: int, update: int,
                    global_step: int) -> bool:
        """True when update ``update`` (1-based, of epoch ``epoch``; ``global_step`` optimizer steps
        taken so far) must be skipped.

        grad_norm: () the clipped gradients' total norm before clipping; loss: () the last backward's.
        Raises NonFiniteError in ``stop`` mode at the ``max_consecutive``-th skipped update in a row.
        """
        bad = self.bad_loss if self.bad_loss is not None else torch.zeros((), dtype=torch.bool)
        self.bad_loss = None
        grad_norm = torch.as_tensor(grad_norm)
        if self.acc.scaler is None:
            bad = bad.to(grad_norm.device) | ~torch.isfinite(grad_norm)
        if self.acc.num_processes > 1:
            bad = self.acc.reduce(bad.float().to(self.acc.device), reduction="sum") > 0
        if not bool(bad):  # the one read per optimizer step
            self.consecutive = 0
            return False
        self.consecutive += 1
        self.skipped += 1
        if self.acc.scaler is not None:  # its unscale_ ran in clipping: close its iteration as a skipped step does
            self.acc.scaler.update()
        detail = (f"{self.consecutive} update(s) in a row had a non-finite loss or gradient (last: loss "
                  f"{float(loss.detach()):.4g}, gradient norm {float(grad_norm):.4g}); they were skipped, the weights are "
                  "finite")
        if self.mode == "stop" and self.consecutive >= self.max_consecutive:
            raise NonFiniteError(epoch, update, global_step, detail)
        log.warning("epoch %d, update %d: skipped: %s", epoch, update, detail)
        return True
