"""The RL-method interface (docs/architecture.md): everything the trainer asks of a method.

A method is a strategy object: nothing outside ``methods/`` branches on ``train.method``. Per
sampling batch of B prompts the trainer samples N = kB trajectories (k =
``trajectories_per_prompt``; ``shared_noise``: the k trajectories of a prompt start from the same
x_T) and asks the method which x0 states to score; per epoch it hands the method the queried
rewards to turn into per-trajectory returns and advantages; per training micro-batch it asks for
the loss of an item. An item is what a training row holds: all k trajectories of a prompt scored
jointly (``trajectories_per_item`` k, SDPO's pair) or one trajectory (``trajectories_per_item`` 1).
The method also owns its batch arithmetic and config checks (``check_batches``) and the update
loop ``train.update_schedule: auto`` means for it (``update_schedule``).

The loss of a training micro-batch is ``batch_loss``: by default the log-prob path (the current
policy's log-probs of the stored transitions -> ``loss``, plus ``train.kl_beta`` times the per-step
Gaussian KL to the reference weights). A forward-process method (DiffusionNFT) overrides it: it noises
the final clean latents again and compares denoiser outputs, asking the loop (a ``TrainingContext``)
for outputs under the live weights or under a copy it keeps (``policies``: "old", "reference"), which
the loop swaps in; ``sampling_policy`` names the copy the rollout samples with and
``snapshot_updates`` how the copies follow the live weights after each epoch.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Protocol

import numpy as np
import torch

from sdpo_core.rl.advantages import batch_normalise
from sdpo_core.rl.losses import gaussian_kl, temporal_weights

UpdateSchedule = Literal["per_step", "per_trajectory"]
# the weights a denoiser call can run with: the live ones, or a copy the training loop keeps
CURRENT, OLD, REFERENCE = "current", "old", "reference"


@dataclass
class ScoredTransitions:
    """The stored transitions of b items (k trajectories each, stacked [trajectory 0 of b; ...]) under a policy."""

    log_probs: tuple[torch.Tensor, ...]  # one (b,) per trajectory of an item
    output: torch.Tensor  # (kb, C, H, W) the (guided) denoiser output at x_t
    x_t: torch.Tensor  # (kb, C, H, W)
    index: torch.Tensor  # (kb,) step indices, on the CPU


class TrainingContext(Protocol):
    """What ``Method.batch_loss`` may ask of the update loop (``training/update.py``'s Updater).

    ``sampler`` is the policy's ``samplers.Sampler`` and ``cond`` a ``families.Conditioning``, typed
    ``Any`` here: the config imports methods, and the prepare stage's code stays free of model code.
    """

    device: torch.device

    @property
    def sampler(self) -> Any: ...

    def score(self, s: Any, rows: torch.Tensor, steps: torch.Tensor, policy: str = CURRENT) -> ScoredTransitions:
        """Items ``rows`` (b,) of EpochSamples ``s`` at step indices ``steps`` (b,) under ``policy``."""

    def output(self, x_t: torch.Tensor, index: torch.Tensor, cond: Any, policy: str = CURRENT) -> torch.Tensor:
        """The (guided) denoiser output at x_t (N, C, H, W), step indices (N,); gradients only for CURRENT."""

    def noise_like(self, x: torch.Tensor) -> torch.Tensor:
        """Standard normal noise shaped like ``x`` from the epoch's training stream (resumable)."""


class Method(ABC):
    name: ClassVar[str]
    #: k: trajectories sampled per prompt of a sampling batch
    trajectories_per_prompt: ClassVar[int] = 2
    #: the k trajectories of a prompt start from the same x_T
    shared_noise: ClassVar[bool]
    #: trajectories per training item: k (scored jointly) or 1 (each trajectory alone)
    trajectories_per_item: ClassVar[int]
    #: per_step: an optimizer step per step position; per_trajectory: a batch's trained steps
    #: accumulated into one update (what ``train.update_schedule: auto`` means for this method)
    update_schedule: ClassVar[UpdateSchedule]
    #: what a training item is called in messages
    item_noun: ClassVar[str] = "trajectories"
    #: advantages from the per-step, per-prompt stat tracker (train.stat_tracking) across epochs
    uses_stat_tracker: ClassVar[bool] = True
    #: the loss reads the sampled transitions' log-probs (False: a forward-process method; then
    #: train.recompute_log_probs has nothing to re-score)
    uses_log_probs: ClassVar[bool] = True
    #: the weights the rollout samples with: CURRENT, or a copy named in ``policies`` (NFT: OLD)
    sampling_policy: ClassVar[str] = CURRENT

    def __init__(self, train: Any, num_steps: int) -> None:
        """``train``: the ``TrainConfig`` (not imported: the config schema imports method code, not
        the other way round)."""
        self.train, self.num_steps = train, num_steps
        self.step_weights = temporal_weights(num_steps, train.lam, train.log_scale)  # SDPO's w_t, (T,)

    # ------------------------------------------------------------------ batch arithmetic
    @classmethod
    def items_per_prompt(cls) -> int:
        """Training items one sampled prompt gives."""
        return cls.trajectories_per_prompt // cls.trajectories_per_item

    @classmethod
    def check_batches(cls, train: Any, sample: Any) -> None:
        """Raise ValueError (with what to change) when ``train`` does not fit the prompts each
        process samples per epoch (``sample``: the SampleConfig). The base check: train.batch_size
        divides the items."""
        k, per_item = cls.trajectories_per_prompt, cls.trajectories_per_item
        if per_item not in (1, k):
            raise ValueError(f"method {cls.name}: trajectories_per_item must be 1 or {k}, got {per_item}")
        ratio = cls.items_per_prompt()
        items = sample.batch_size * sample.num_batches_per_epoch * ratio
        if items % train.batch_size:
            raise ValueError(
                f"train.batch_size={train.batch_size} does not divide the {items} "
                f"{cls.item_noun} each process samples per epoch "
                f"(sample.batch_size={sample.batch_size} x sample.num_batches_per_epoch={sample.num_batches_per_epoch}"
                f"{'' if ratio == 1 else f' x {ratio}'}); choose a train.batch_size that divides {items}"
            )

    # ------------------------------------------------------------------ the RL maths
    @property
    @abstractmethod
    def tracked_steps(self) -> int:
        """Columns of the returns the stat tracker normalises (T for dense, 1 for a final reward)."""

    @abstractmethod
    def scored_steps(self, x0: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Which x0 states to decode and score: x0 (N, T, C, H, W) -> (steps (N, Q) long, extras
        (CPU tensors the method needs again in ``returns``, e.g. the anchor and similarities))."""

    @abstractmethod
    def returns(self, rewards_queried: torch.Tensor, extras: dict[str, torch.Tensor]) -> torch.Tensor:
        """(N, Q) measured rewards -> (N, tracked_steps) float32 returns to normalise."""

    @abstractmethod
    def loss(self, log_probs_new: list[torch.Tensor], log_probs_old: list[torch.Tensor],
             advantages: list[torch.Tensor], weights: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Loss of b items: one (b,) tensor per trajectory of an item in each list; ``weights`` (b,)
        the temporal weights of the items' steps. Returns (scalar loss, diagnostics)."""

    def policies(self) -> tuple[str, ...]:
        """Copies of the trained weights the training loop keeps for this method: REFERENCE (the weights
        training started from) when ``train.kl_beta`` > 0."""
        return (REFERENCE,) if self.train.kl_beta > 0 else ()

    def snapshot_updates(self, global_step: int) -> dict[str, float]:
        """After an epoch's updates (``global_step`` optimizer steps so far): copy name -> w, each copy
        moved toward the live weights as copy + w (live - copy). None by default."""
        return {}

    def batch_loss(self, ctx: TrainingContext, s: Any, rows: torch.Tensor,
                   steps: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss of items ``rows`` (b,) of EpochSamples ``s`` at step indices ``steps`` (b,), with diagnostics:
        ``loss`` on the current and sampling-time log-probs, plus ``train.kl_beta`` x the per-step KL
        between the current and the reference policy's step Gaussians (Flow-GRPO's KL term)."""
        dev = ctx.device
        # the reference's no-grad forward first: the live weights are swapped back before the graph is built
        ref = ctx.score(s, rows, steps, REFERENCE) if self.train.kl_beta > 0 else None
        new = ctx.score(s, rows, steps)
        lp_old = [p[rows, steps].to(dev) for p in s.log_probs]
        adv = [a[rows, steps].to(dev) for a in s.advantages]
        loss, diag = self.loss(list(new.log_probs), lp_old, adv, self.step_weights[steps].to(dev))
        if ref is not None:
            mine = ctx.sampler.transition(new.output, new.index, new.x_t)
            theirs = ctx.sampler.transition(ref.output, ref.index, ref.x_t)
            kl = gaussian_kl(mine.mean, theirs.mean, mine.std).mean()
            loss = loss + self.train.kl_beta * kl
            diag["kl_ref"] = kl.detach()
        return loss, diag

    def epoch_prompts(self, rng: np.random.Generator, train_prompts: list[str], num_batches: int,
                      batch_size: int) -> list[list[str]]:
        """The prompts of an epoch's sampling batches (each prompt yields k trajectories):
        drawn uniformly with replacement, batch by batch."""
        return [[train_prompts[i] for i in rng.integers(0, len(train_prompts), batch_size)]
                for _ in range(num_batches)]

    def advantages(self, prompts: list[str], returns: torch.Tensor, stat_tracker: Any) -> torch.Tensor:
        """(N, tracked_steps) returns of all processes' trajectories -> advantages: the stat tracker's
        per-(prompt, step) normalisation, or batch statistics when it is off (``stat_tracker`` None)."""
        if stat_tracker is not None:
            return stat_tracker.update(prompts, returns)
        return batch_normalise(returns)

    def reward_stats(self, rewards_queried: torch.Tensor) -> dict[str, float]:
        """Per-epoch reward metrics from all processes' (N, Q) measured rewards (last column: final)."""
        last = rewards_queried[:, -1]
        return {"reward/last": float(last.mean()), "reward/last_std": float(last.std())}
