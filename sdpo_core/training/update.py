"""Step 4 of an epoch: the policy updates on the epoch's samples.

For each inner epoch the items are shuffled and cut into train batches, each item's steps put in
an independent random order; the trained (batch, step position) pairs are visited in the update
schedule's order (``train.update_schedule``, ``auto``: the method's own), one backward each, an
optimizer step every ``gradient_accumulation_steps`` batches (x the trained steps per_trajectory).
An update whose loss or gradient is not finite is skipped, or stops the run (``nonfinite.py``).
The loss of a micro-batch is the method's (``Method.batch_loss``), which asks this loop (a
``methods.method.TrainingContext``) for log-probs or denoiser outputs under the live weights or a copy
of them (``weights.PolicyWeights``: the old policy, the KL reference); after every optimizer step the
EMA follows, after every epoch the method's copies (``Method.snapshot_updates``).
"""

from __future__ import annotations

import logging
import math
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
from accelerate import Accelerator
from torch.distributed.tensor import DTensor
from tqdm.auto import tqdm

from sdpo_core.families.family import Conditioning
from sdpo_core.methods import Method
from sdpo_core.methods.method import CURRENT, ScoredTransitions
from sdpo_core.samplers import Sampler
from sdpo_core.sampling import DenoiseFn, Policy, guided_output
from sdpo_core.training.nonfinite import NonFiniteGuard
from sdpo_core.training.rollout import EpochSamples, derive_seed
from sdpo_core.training.weights import PolicyWeights

log = logging.getLogger(__name__)
# pre-update approx KL above which sampling and training disagree (float32 agrees to ~1e-12)
KL_WARN = 1e-6


def work_order(batches: list[torch.Tensor], n_steps: int, per_step: bool) -> list[tuple[torch.Tensor, int]]:
    """The (rows, step position) pairs of an inner epoch in training order: step positions outer
    (per_step, SDPO's loop) or each batch's trained steps in a row (per_trajectory, DDPO's loop)."""
    if per_step:
        return [(rows, j) for j in range(n_steps) for rows in batches]
    return [(rows, j) for rows in batches for j in range(n_steps)]


class Updater:
    """Trains ``denoiser`` (as prepared by accelerate) on EpochSamples with ``method``'s loss.

    ``denoise``: the training-time denoiser call (``sampling.denoiser_caller`` on the prepared
    model); ``weights``: the copies of the trained weights the method and the EMA need;
    ``on_optimizer_step`` runs after every optimizer step (not after a skipped update).
    """

    def __init__(self, cfg: Any, acc: Accelerator, denoiser: torch.nn.Module, denoise: DenoiseFn,
                 optimizer: torch.optim.Optimizer, trainable: list[torch.nn.Parameter], policy: Policy,
                 method: Method, per_step: bool, on_optimizer_step: Callable[[], None],
                 weights: PolicyWeights) -> None:
        self.cfg, self.acc, self.denoiser, self.denoise = cfg, acc, denoiser, denoise
        self.optimizer, self.trainable, self.policy, self.method = optimizer, trainable, policy, method
        self.per_step, self.on_optimizer_step, self.weights = per_step, on_optimizer_step, weights
        self.device = acc.device
        rc = cfg.train.recompute_log_probs
        self.recompute_log_probs = method.uses_log_probs and (rc == "always" or (rc == "auto" and
                                                                                  acc.mixed_precision != "no"))
        # noise of a forward-process method's x_t: one stream per (epoch, process), reseeded each epoch
        self.noise_gen = torch.Generator().manual_seed(derive_seed(cfg.seed, 0, acc.process_index, 4))
        self.global_step = 0
        self.guard = NonFiniteGuard(acc, cfg.train.nonfinite, cfg.train.max_nonfinite_steps)
        self._micro = 0  # backward passes since the last optimizer step (or skipped update)
        self._epoch, self._update = 0, 0  # the epoch being trained and its updates so far (for messages)

    # ------------------------------------------------------------------ the method's TrainingContext
    @property
    def sampler(self) -> Sampler:
        return self.policy.sampler

    def noise_like(self, x: torch.Tensor) -> torch.Tensor:
        return torch.randn(x.shape, generator=self.noise_gen).to(x.device)

    def output(self, x_t: torch.Tensor, index: torch.Tensor, cond: Conditioning,
               policy: str = CURRENT) -> torch.Tensor:
        """(Guided) denoiser output at x_t (N, C, H, W), step indices (N,), under ``policy``'s weights."""
        neg = self.policy.negatives(len(index))
        t = self.policy.timesteps[index]
        if policy == CURRENT:
            return guided_output(self.denoise, x_t, t, cond, self.cfg.sample.guidance_scale, neg)
        with torch.no_grad(), self.weights.use(policy):
            return guided_output(self.denoise, x_t, t, cond, self.cfg.sample.guidance_scale, neg)

    def score(self, s: EpochSamples, rows: torch.Tensor, steps: torch.Tensor,
              policy: str = CURRENT) -> ScoredTransitions:
        """Log-probs under ``policy`` of items ``rows`` (b,) at steps ``steps`` (b,): one (b,) per
        trajectory of an item, from one denoiser call over all of them."""
        dev, k = self.acc.device, len(s.latents)
        x_t = torch.cat([lat[rows, steps] for lat in s.latents]).to(dev)
        x_prev = torch.cat([lat[rows, steps + 1] for lat in s.latents]).to(dev)
        index = steps.repeat(k)  # step indices stay on the host: the sampler reads its schedule there
        out = self.output(x_t, index, s.cond[rows].repeat(k).to(dev), policy)
        lp = self.policy.sampler.step(out, index, x_t, prev_sample=x_prev).log_prob
        return ScoredTransitions(lp.chunk(k), out, x_t, index)

    def new_log_probs(self, s: EpochSamples, rows: torch.Tensor, steps: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Current-policy log-probs of items ``rows`` (b,) at steps ``steps`` (b,), one (b,) per trajectory."""
        return self.score(s, rows, steps).log_probs

    def batch_loss(self, s: EpochSamples, rows: torch.Tensor, steps: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """The method's loss of items ``rows`` (b,) at step indices ``steps`` (b,), with its diagnostics."""
        return self.method.batch_loss(self, s, rows, steps)

    @torch.no_grad()
    def recompute_old_log_probs(self, s: EpochSamples, batches: list[torch.Tensor], step_perm: torch.Tensor,
                                n_steps: int) -> None:
        """Score the sampled transitions again in the exact batch layout training will use.

        Half-precision denoiser outputs depend on the batch composition; sigma_t is small at late
        steps, so sampling-time and training-time log-probs of the same transition can differ by far
        more than ``clip_range`` (measured on an H100 with bf16: approx KL 0.04 before any update).
        One extra no-grad forward per training item makes the ratio exactly 1 before the first update.
        """
        for j in range(n_steps):
            for rows in batches:
                steps = step_perm[rows, j]
                for old, new in zip(s.log_probs, self.new_log_probs(s, rows, steps), strict=True):
                    old[rows, steps] = new.float().cpu()

    def train_epoch(self, s: EpochSamples, epoch: int) -> dict[str, float]:
        """All inner epochs of updates on ``s``; returns the epoch's mean loss and diagnostics."""
        cfg, acc, train = self.cfg, self.acc, self.cfg.train
        gen = torch.Generator().manual_seed(derive_seed(cfg.seed, epoch, acc.process_index, 3))
        self.noise_gen.manual_seed(derive_seed(cfg.seed, epoch, acc.process_index, 4))
        m, num_steps = len(s.cond), cfg.sample.num_steps
        n_steps = max(1, math.ceil(num_steps * train.timestep_fraction))
        info: dict[str, list[torch.Tensor]] = defaultdict(list)
        self.guard.reset_epoch()
        self._epoch, self._update = epoch, 0
        self.denoiser.train()
        start = time.perf_counter()
        for inner in range(train.num_inner_epochs):
            order = torch.randperm(m, generator=gen) if train.shuffle_batch else torch.arange(m)
            if train.shuffle_timesteps:  # an independent permutation of the steps per item
                step_perm = torch.rand(m, num_steps, generator=gen).argsort(dim=1)
            else:
                step_perm = torch.arange(num_steps).expand(m, num_steps)
            batches = list(order.split(train.batch_size))
            if inner == 0 and self.recompute_log_probs:
                self.recompute_old_log_probs(s, batches, step_perm, n_steps)
            # closed on the way out of a stop too: the error message then starts its own line
            with tqdm(total=n_steps * len(batches), desc=f"epoch {epoch}: training",
                      disable=not acc.is_local_main_process, leave=False) as bar:
                for rows, j in work_order(batches, n_steps, self.per_step):
                    self.train_step(s, rows, step_perm[rows, j], info)
                    bar.update()
        for name, weight in self.method.snapshot_updates(self.global_step).items():  # e.g. NFT's old policy
            self.weights.blend(name, weight)
        return self._epoch_metrics(info, epoch, time.perf_counter() - start)

    def _epoch_metrics(self, info: dict[str, list[torch.Tensor]], epoch: int, seconds: float) -> dict[str, float]:
        # a key whose values all belonged to skipped updates has none left
        metrics = {k: float(torch.stack([x.to("cpu") for x in v]).mean()) for k, v in info.items() if v}
        metrics["nonfinite/skipped"] = self.guard.skipped
        if not info["approx_kl"]:
            metrics["time/training"] = seconds
            return metrics
        # before the first update the ratio must be 1: a non-zero value means sampling and training
        # score transitions differently (see train.recompute_log_probs)
        metrics["check/first_batch_kl"] = float(info["approx_kl"][0])
        if metrics["check/first_batch_kl"] > KL_WARN and not self.recompute_log_probs:
            log.warning("epoch %d: approx KL %.3g before the first update (want ~0): sampling and training "
                        "score transitions differently on this device; set train.recompute_log_probs=always",
                        epoch, metrics["check/first_batch_kl"])
        metrics["time/training"] = seconds
        return metrics

    def train_step(self, s: EpochSamples, rows: torch.Tensor, steps: torch.Tensor,
                   info: dict[str, list[torch.Tensor]]) -> None:
        """One backward on items ``rows`` at ``steps``; an optimizer step when accumulation is complete
        (skipped when the update is not finite: ``nonfinite.py``)."""
        acc = self.acc
        skipped = False
        with acc.accumulate(self.denoiser):
            loss, diag = self.batch_loss(s, rows, steps)
            acc.backward(loss)
            self.guard.observe(loss)
            self._micro += 1
            if acc.sync_gradients:
                norm = acc.clip_grad_norm_(self.trainable, self.cfg.train.max_grad_norm)
                if isinstance(norm, DTensor):  # sharded (FSDP): the norm over every process's shards
                    norm = norm.full_tensor()
                self._update += 1
                skipped = self.guard.skip_update(norm, loss, self._epoch, self._update, self.global_step)
                if not skipped:
                    info["grad_norm"].append(torch.as_tensor(norm).detach().float())
            if not skipped:
                self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        # kept as tensors and averaged once per epoch: a float() here would wait on the GPU every step
        info["loss"].append(loss.detach().float())
        for k, v in diag.items():
            info[k].append(v.float())
        if skipped:  # the skipped update's backward passes leave the epoch's means
            for k in ("loss", *diag):
                del info[k][-self._micro:]
        if acc.sync_gradients:
            self._micro = 0
            if not skipped:
                self.global_step += 1
                self.weights.after_optimizer_step(self.global_step)
                self.on_optimizer_step()
