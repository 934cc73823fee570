"""The trainer's public hooks: subclass ``TrainerCallback``, override what you need, and pass
instances as ``Trainer(..., callbacks=[...])``. Every hook runs on every process, in the main
thread, in the order of the list; ``trainer.acc.is_main_process`` tells the process writing.

Order within a run::

    on_run_start(trainer, start_epoch)          # after the run dir is prepared (and resumed)
    for each epoch:
        on_epoch_start(trainer, epoch)
        on_rewards(trainer, epoch, scored)      # once per sampling batch, after sampling
        on_optimizer_step(trainer)              # after each optimizer step (trainer.global_step)
        on_epoch_end(trainer, epoch, metrics)   # after the metrics line is written, before the checkpoint
    on_run_end(trainer, final)                  # the trained model's directory
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sdpo_core.training.scoring import ScoredBatch


class TrainerCallback:
    """No-op hooks; ``trainer`` is the ``Trainer`` running them."""

    def on_run_start(self, trainer: Any, start_epoch: int) -> None:
        """The run starts at ``start_epoch`` (0, or the epoch after a resumed checkpoint)."""

    def on_epoch_start(self, trainer: Any, epoch: int) -> None:
        """Epoch ``epoch`` is about to sample."""

    def on_rewards(self, trainer: Any, epoch: int, scored: ScoredBatch) -> None:
        """A sampling batch's reward job: its (N, Q) rewards, queries, decodes and their seconds."""

    def on_optimizer_step(self, trainer: Any) -> None:
        """An optimizer step was taken; ``trainer.global_step`` counts them."""

    def on_epoch_end(self, trainer: Any, epoch: int, metrics: dict[str, float]) -> None:
        """Epoch ``epoch`` trained; ``metrics`` is the line written to train_metrics.jsonl."""

    def on_run_end(self, trainer: Any, final: Path) -> None:
        """The run finished and saved the trained model to ``final``."""


class CallbackList(TrainerCallback):
    """Calls each of ``callbacks`` in turn."""

    def __init__(self, callbacks: list[TrainerCallback]) -> None:
        self.callbacks = list(callbacks)

    def on_run_start(self, trainer: Any, start_epoch: int) -> None:
        for cb in self.callbacks:
            cb.on_run_start(trainer, start_epoch)

    def on_epoch_start(self, trainer: Any, epoch: int) -> None:
        for cb in self.callbacks:
            cb.on_epoch_start(trainer, epoch)

    def on_rewards(self, trainer: Any, epoch: int, scored: ScoredBatch) -> None:
        for cb in self.callbacks:
            cb.on_rewards(trainer, epoch, scored)

    def on_optimizer_step(self, trainer: Any) -> None:
        for cb in self.callbacks:
            cb.on_optimizer_step(trainer)

    def on_epoch_end(self, trainer: Any, epoch: int, metrics: dict[str, float]) -> None:
        for cb in self.callbacks:
            cb.on_epoch_end(trainer, epoch, metrics)

    def on_run_end(self, trainer: Any, final: Path) -> None:
        for cb in self.callbacks:
            cb.on_run_end(trainer, final)
