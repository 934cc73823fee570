"""Sampling an epoch: the method's prompts, k trajectories per prompt, the reward jobs, advantages.

``Rollout.sample_epoch`` is steps 1-3 of an epoch (see ``training/trainer.py``): it samples
``sample.num_batches_per_epoch`` batches of B prompts (k = ``method.trajectories_per_prompt``
trajectories each, from a shared or independent x_T), submits each batch's reward job to the
worker thread while the next batch samples, then turns the gathered rewards into the method's
returns and advantages and regroups the trajectories into the method's training items.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from sdpo_core.families.family import Conditioning
from sdpo_core.methods import Method
from sdpo_core.sampling import Policy
from sdpo_core.training.scoring import RewardJob, ScoredBatch


def derive_seed(*parts: int) -> int:
    """Deterministic 63-bit seed from integers (seed, epoch, process, stream): an FNV-1a-style hash."""
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (p & 0xFFFFFFFF)) * 1099511628211) % (1 << 63)
    return h


@dataclass
class EpochSamples:
    """One process's training items of an epoch: M items of the method's trajectories_per_item each."""

    cond: Conditioning  # M rows: the prompt conditioning of each item
    latents: list[torch.Tensor]  # one (M, T+1, C, H, W) per trajectory of an item
    log_probs: list[torch.Tensor]  # one (M, T) per trajectory
    advantages: list[torch.Tensor] = field(default_factory=list)  # one (M, T) per trajectory
    prompts: list[str] = field(default_factory=list)  # M: the prompt of each item
    # one (M, C, H, W) per trajectory: the last step's x0, the image the final reward scored
    # (what a forward-process method such as DiffusionNFT trains on)
    x0_final: list[torch.Tensor] = field(default_factory=list)


@dataclass
class SampledBatch:
    """One sampling batch of B prompts and its kB trajectories (trajectory j of prompt i: row jB + i)."""

    cond: Conditioning  # B rows, on the CPU
    latents: torch.Tensor  # (kB, T+1, C, H, W)
    log_probs: torch.Tensor  # (kB, T)
    extras: dict[str, torch.Tensor]  # what the method's ``returns`` needs again
    prompts: list[str]  # B
    x0_final: torch.Tensor  # (kB, C, H, W): the last step's x0


@dataclass
class EpochRollout:
    """``Rollout.sample_epoch``'s result."""

    samples: EpochSamples
    prompts: list[str]  # this process's trajectories' prompts, in sampling order (kB per batch)
    stats: dict[str, float]  # time/*, reward/* and reward_component/* metrics of the epoch
    first: ScoredBatch | None = None  # the first batch's scoring: its panel when the epoch logs a grid


class Rollout:
    """Samples epochs with ``policy`` for ``method``; ``denoiser`` is the (unwrapped) model sampled."""

    def __init__(self, cfg: Any, acc: Accelerator, family: Any, denoiser: torch.nn.Module, policy: Policy,
                 method: Method, score: RewardJob, stat_tracker: Any, train_prompts: list[str],
                 encode: Callable[[list[str]], Any] | None = None) -> None:
        """``encode``: prompts -> Conditioning (default ``family.encode``; a PromptEmbeddings cache)."""
        self.cfg, self.acc, self.family, self.denoiser, self.policy = cfg, acc, family, denoiser, policy
        self.encode = encode or family.encode
        self.method, self.score, self.stat_tracker, self.train_prompts = method, score, stat_tracker, train_prompts
        self.latent_shape = family.latent_shape(cfg.sample.resolution)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reward")

    def sample_batch(self, prompts: list[str], gen: torch.Generator, grid: int = 0) -> tuple[SampledBatch, Future]:
        """Sample k trajectories per prompt and submit their reward job (a Future of ScoredBatch)."""
        b, k, shared = len(prompts), self.method.trajectories_per_prompt, self.method.shared_noise
        cond = self.encode(prompts)
        # one x_T per prompt when shared, else one per trajectory: (b, ...) or (kb, ...)
        noise = torch.randn((b if shared else k * b, *self.latent_shape), generator=gen)
        self.denoiser.eval()
        traj = self.policy.sample_groups(cond, noise.to(self.acc.device), gen, k=k, shared_noise=shared)
        steps, extras = self.method.scored_steps(traj.x0)
        future = self.executor.submit(self.score, traj.x0.cpu(), steps, prompts * k, grid)
        batch = SampledBatch(cond.cpu(), traj.latents.cpu(), traj.log_probs.cpu(), extras, prompts,
                             traj.x0[:, -1].cpu())
        return batch, future

    def sample_epoch(self, epoch: int, grid: int, on_rewards: Callable[[ScoredBatch], None]) -> EpochRollout:
        """Sample, score and assemble one epoch; ``grid`` > 0 puts a sample panel of that many
        trajectories in the first batch's ScoredBatch; ``on_rewards`` sees every batch's ScoredBatch."""
        cfg, rank = self.cfg, self.acc.process_index
        gen = torch.Generator().manual_seed(derive_seed(cfg.seed, epoch, rank, 1))
        prompt_rng = np.random.default_rng(derive_seed(cfg.seed, epoch, rank, 2))
        batches, futures = [], []
        t0 = time.perf_counter()
        epoch_prompts = self.method.epoch_prompts(prompt_rng, self.train_prompts, cfg.sample.num_batches_per_epoch,
                                                  cfg.sample.batch_size)
        for j, prompts in enumerate(tqdm(epoch_prompts, desc=f"epoch {epoch}: sampling",
                                         disable=not self.acc.is_local_main_process, leave=False)):
            batch, future = self.sample_batch(prompts, gen, grid if j == 0 else 0)
            batches.append(batch)
            futures.append(future)
        t_sample = time.perf_counter() - t0
        scored = [f.result() for f in futures]
        t_wait = time.perf_counter() - t0 - t_sample
        for result in scored:
            on_rewards(result)
        stats = {"time/sampling": t_sample, "time/reward_wait": t_wait,
                 "time/reward": sum(r.seconds for r in scored)}
        for name in scored[0].components if scored else {}:
            stats[f"reward_component/{name}"] = float(np.mean([r.components[name] for r in scored]))
        rollout = self.assemble(batches, [r.rewards for r in scored], stats)
        rollout.first = scored[0] if scored else None
        return rollout

    def assemble(self, batches: list[SampledBatch], queried: list[torch.Tensor],
                 stats: dict[str, float]) -> EpochRollout:
        """Returns and advantages (over all processes' trajectories) of the batches' (kB, Q) queried rewards."""
        k = self.method.trajectories_per_prompt
        traj_prompts: list[str] = []
        for batch in batches:
            traj_prompts += batch.prompts * k
        # (N, T) dense returns or (N, 1) final rewards, N = k x prompts of this process
        returns = torch.cat([self.method.returns(rq, b.extras) for b, rq in zip(batches, queried, strict=True)])
        all_returns = self.acc.gather(returns.to(self.acc.device)).cpu()
        all_prompts = gather_object(traj_prompts) if self.acc.num_processes > 1 else traj_prompts
        adv_all = self.method.advantages(list(all_prompts), all_returns, self.stat_tracker)
        n = returns.shape[0]
        adv = adv_all[self.acc.process_index * n:(self.acc.process_index + 1) * n]
        all_queried = self.acc.gather(torch.cat(queried).to(self.acc.device)).cpu()
        stats.update(self.method.reward_stats(all_queried))
        return EpochRollout(self.split_items(batches, adv), traj_prompts, stats)

    def split_items(self, batches: list[SampledBatch], adv: torch.Tensor) -> EpochSamples:
        """Regroup per-batch [trajectory 0 of B; ...; trajectory k-1 of B] rows into per-trajectory
        arrays (an item: the k trajectories of a prompt), or into one array of single trajectories
        (trajectory 0 of every batch, then trajectory 1, ...) when an item is one trajectory."""
        k = self.method.trajectories_per_prompt
        adv = adv.expand(-1, self.cfg.sample.num_steps) if adv.shape[1] == 1 else adv
        sizes = [len(b.cond) for b in batches]
        adv_chunks = list(torch.split(adv, [k * b for b in sizes]))

        def by_trajectory(per_batch: list[torch.Tensor]) -> list[torch.Tensor]:
            return [torch.cat([x[j * b:(j + 1) * b] for x, b in zip(per_batch, sizes, strict=True)])
                    for j in range(k)]

        cond = Conditioning.cat([b.cond for b in batches])
        latents = by_trajectory([b.latents for b in batches])
        log_probs = by_trajectory([b.log_probs for b in batches])
        advantages = by_trajectory(adv_chunks)
        x0_final = by_trajectory([b.x0_final for b in batches])
        prompts = [p for b in batches for p in b.prompts]
        if self.method.trajectories_per_item == k:
            return EpochSamples(cond, latents, log_probs, advantages, prompts, x0_final)
        # every trajectory is its own item
        return EpochSamples(cond.repeat(k), [torch.cat(latents)], [torch.cat(log_probs)], [torch.cat(advantages)],
                            prompts * k, [torch.cat(x0_final)])

    def close(self) -> None:
        self.executor.shutdown()
