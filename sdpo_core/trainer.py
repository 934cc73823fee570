"""The online RL loop: sample paired trajectories, score them densely, update the UNet.

Run it with ``sdpo train --pipeline NAME``; for several GPUs (or two CPU processes) start the
same command under ``accelerate launch`` / ``torchrun``: every process samples its own prompts
and noise (per-process seeds), rewards and prompts are gathered so that all processes hold the
same stat tracker, gradients are averaged by accelerate, and only the main process writes.

One epoch (``Trainer.run_epoch``):
  1. sample ``sample.num_batches_per_epoch`` batches of B prompts, two trajectories each from the
     same x_T (DDPO: independent x_T); record x_t, x0_t and log-probs per step;
  2. while the next batch samples, a worker thread decodes x0 at the first, anchor and last steps
     and scores them (three reward queries per trajectory whatever T is; DDPO: last only);
  3. dense rewards -> discounted returns -> per-step, per-prompt advantages (gathered);
  4. step-shuffled updates: for each step position, over the train batches, accumulating
     ``gradient_accumulation_steps`` batches per optimizer step (SDPO loss or DDPO loss);
  5. checkpoint (atomic) and log metrics.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from peft.utils import set_peft_model_state_dict
from tqdm.auto import tqdm

from sdpo_core import checkpoint as ckpt
from sdpo_core.advantages import PerStepPromptStatTracker, batch_normalise, discounted_returns
from sdpo_core.checkpoint import ResumeError
from sdpo_core.config import Config, batch_plan, dump_yaml, micro_steps_per_update, resolve_update_schedule
from sdpo_core.dense_rewards import predict_dense_rewards, query_steps, similarities
from sdpo_core.losses import ddpo_loss, sdpo_loss, temporal_weights
from sdpo_core.models import DTYPES, add_lora, decode_latents, encode_prompts, load_pipeline, lora_param_keys
from sdpo_core.models import save_trained as save_trained_model
from sdpo_core.rewards import build_reward, check_rewards
from sdpo_core.sampling import guided_output, sample_pairs
from sdpo_core.scheduling import DDIMParams, ddim_step
from sdpo_core.tracking import NullTracker, Tracker

log = logging.getLogger(__name__)


def _to_cpu_copy(obj):
    """A copy of ``obj`` (nested dicts / lists / tuples of tensors) that owns CPU memory."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu_copy(v) for v in obj)
    return obj


def _seed(*parts: int) -> int:
    """Deterministic 63-bit seed from integers (seed, epoch, process, stream)."""
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (p & 0xFFFFFFFF)) * 1099511628211) % (1 << 63)
    return h


@dataclass
class EpochSamples:
    """One process's samples of an epoch. M items: pairs (sdpo) or trajectories (ddpo)."""

    embeds: torch.Tensor  # (M, L, D)
    latents: list[torch.Tensor]  # one (M, T+1, C, H, W) per trajectory of an item (2 for sdpo)
    log_probs: list[torch.Tensor]  # one (M, T) per trajectory
    advantages: list[torch.Tensor] = field(default_factory=list)  # one (M, T) per trajectory


class Trainer:
    def __init__(
        self,
        cfg: Config,
        run_dir: str | Path,
        tracker: Tracker | None = None,
        accelerator: Accelerator | None = None,
        on_optimizer_step: Callable[[Trainer], None] | None = None,
        train_prompts: list[str] | None = None,
    ) -> None:
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.acc = accelerator or Accelerator(
            mixed_precision=cfg.model.mixed_precision, cpu=not torch.cuda.is_available(),
        )
        # backward passes per optimizer step: accumulation batches (x the trained steps per_trajectory)
        self.acc.gradient_accumulation_steps = micro_steps_per_update(cfg)
        self.per_step_updates = resolve_update_schedule(cfg.train) == "per_step"
        self.plan = batch_plan(cfg, self.acc.num_processes)
        self.tracker = tracker if (tracker is not None and self.acc.is_main_process) else NullTracker()
        self.on_optimizer_step = on_optimizer_step
        self.global_step = 0
        self._setup_model()
        if train_prompts is None:
            from sdpo_core.prompts import load_train_eval

            train_prompts, _ = load_train_eval(cfg.prompts.source, cfg.prompts.eval_fraction, cfg.prompts.seed)
        if not train_prompts:
            raise ValueError("no training prompts")
        self.train_prompts = list(train_prompts)
        self.reward_fn = build_reward(cfg.reward.name, cfg.reward.options, self.acc.device, self.infer_dtype)
        t_track = cfg.sample.num_steps if cfg.train.method == "sdpo" else 1
        st = cfg.train.stat_tracking
        self.stat_tracker = PerStepPromptStatTracker(st.buffer_size, st.min_count, t_track) if st.enabled else None
        rc = cfg.train.recompute_log_probs
        self.recompute_log_probs = rc == "always" or (rc == "auto" and self.acc.mixed_precision != "no")
        self.weights = temporal_weights(cfg.sample.num_steps, cfg.train.lam, cfg.train.log_scale)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reward")
        self.checkpoints = ckpt.CheckpointWriter(background=cfg.train.async_checkpoint)
        self.config_yaml = dump_yaml(cfg)

    # ------------------------------------------------------------------ set-up
    def _setup_model(self) -> None:
        cfg, acc = self.cfg, self.acc
        self.infer_dtype = DTYPES[acc.mixed_precision] if acc.mixed_precision != "no" else torch.float32
        self.pipe = load_pipeline(
            cfg.model.pretrained, cfg.model.revision, acc.device, self.infer_dtype, cfg.model.timestep_spacing
        )
        unet = self.pipe.unet
        torch.manual_seed(cfg.seed)  # LoRA init: the same in every process and every run of a config
        if cfg.model.finetune == "lora":
            unet.to(dtype=self.infer_dtype)
            add_lora(unet, cfg.model.lora_rank, cfg.model.lora_alpha, cfg.model.lora_target_modules)
        else:
            unet.requires_grad_(True)
        if cfg.model.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        self.pipe.scheduler.set_timesteps(cfg.sample.num_steps, device="cpu")
        self.timesteps = self.pipe.scheduler.timesteps.clone().long()
        self.ddim = DDIMParams.from_scheduler(self.pipe.scheduler, cfg.sample.num_steps, cfg.sample.last_step)
        self.trainable = [p for p in unet.parameters() if p.requires_grad]
        t = cfg.train
        # foreach: one multi-tensor kernel per update instead of a Python loop over the LoRA tensors
        # (torch picks it by itself only on CUDA); the same update rule
        optimizer = torch.optim.AdamW(
            self.trainable, lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2),
            weight_decay=t.adam_weight_decay, eps=t.adam_epsilon, foreach=True,
        )
        # checkpoint key -> live parameter, resolved once (peft's state-dict walk costs ms per call)
        self.lora_params = lora_param_keys(unet) if cfg.model.finetune == "lora" else None
        self.unet, self.optimizer = acc.prepare(unet, optimizer)
        size = cfg.sample.resolution or unet.config.sample_size * self.pipe.vae_scale_factor
        self.latent_shape = (unet.config.in_channels, size // self.pipe.vae_scale_factor,
                             size // self.pipe.vae_scale_factor)
        empty = encode_prompts(self.pipe, [""])
        self.negative_embed = empty if cfg.sample.guidance_scale > 1 else None

    def _unet_fn(self, model: torch.nn.Module) -> Callable:
        def fn(x: torch.Tensor, t: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
            with self.acc.autocast():
                return model(x.to(self.infer_dtype), t, encoder_hidden_states=e.to(self.infer_dtype)).sample

        return fn

    # ------------------------------------------------------------------ sampling + rewards
    def _reward_job(self, x0: torch.Tensor, steps: torch.Tensor, prompts: list[str]) -> tuple[torch.Tensor, float]:
        """Decode x0 at the queried steps and score them; runs in the worker thread.

        x0: (N, T, C, H, W); steps: (N, Q) step indices. Returns (N, Q) rewards and busy seconds.
        Each distinct (trajectory, step) is decoded and scored once (T = 1 or 2 repeat steps).
        """
        start = time.perf_counter()
        n, t = x0.shape[:2]
        flat = (torch.arange(n)[:, None] * t + steps).flatten()
        unique, inverse = torch.unique(flat, return_inverse=True)
        images = decode_latents(self.pipe, x0.flatten(0, 1)[unique].to(self.acc.device))
        item_prompts = [prompts[int(i) // t] for i in unique]
        values = check_rewards(self.cfg.reward.name, self.reward_fn(images, item_prompts), len(unique))
        # combined rewards expose each component's values of the last call: log their means
        parts = getattr(self.reward_fn, "last_components", None) or {}
        self._component_means.append({k: float(v.float().mean()) for k, v in parts.items()})
        return values.cpu()[inverse].reshape(steps.shape), time.perf_counter() - start

    def _sample_batch(self, prompts: list[str], gen: torch.Generator) -> tuple[dict, Future]:
        cfg, b = self.cfg, len(prompts)
        paired = cfg.train.method == "sdpo"
        embeds = encode_prompts(self.pipe, prompts)
        noise = torch.randn((b if paired else 2 * b, *self.latent_shape), generator=gen)
        neg = self.negative_embed.expand(b, -1, -1) if self.negative_embed is not None else None
        model = self.acc.unwrap_model(self.unet)
        model.eval()
        traj = sample_pairs(
            self._unet_fn(model), self.ddim, self.timesteps, embeds, noise.to(self.acc.device, self.infer_dtype),
            cfg.sample.eta, gen, cfg.sample.guidance_scale, neg, paired=paired,
        )
        if paired:
            anchor, sims = (v.cpu() for v in similarities(traj.x0))
            steps = query_steps(anchor, traj.num_steps)
        else:
            anchor = sims = None
            steps = torch.full((2 * b, 1), traj.num_steps - 1)
        future = self.executor.submit(self._reward_job, traj.x0.cpu(), steps, prompts * 2)
        out = {"embeds": embeds.cpu(), "latents": traj.latents.cpu(), "log_probs": traj.log_probs.cpu(),
               "anchor": anchor, "sims": sims}
        return out, future

    def sample_epoch(self, epoch: int) -> tuple[EpochSamples, list[str], dict[str, float]]:
        cfg, rank = self.cfg, self.acc.process_index
        gen = torch.Generator().manual_seed(_seed(cfg.seed, epoch, rank, 1))
        prompt_rng = np.random.default_rng(_seed(cfg.seed, epoch, rank, 2))
        batches, futures, prompts_all = [], [], []
        self._component_means: list[dict[str, float]] = []
        t0 = time.perf_counter()
        for _ in tqdm(range(cfg.sample.num_batches_per_epoch), desc=f"epoch {epoch}: sampling",
                      disable=not self.acc.is_local_main_process, leave=False):
            idx = prompt_rng.integers(0, len(self.train_prompts), cfg.sample.batch_size)
            prompts = [self.train_prompts[i] for i in idx]
            out, fut = self._sample_batch(prompts, gen)
            batches.append(out)
            futures.append(fut)
            prompts_all.append(prompts)
        t_sample = time.perf_counter() - t0
        results = [f.result() for f in futures]
        t_wait = time.perf_counter() - t0 - t_sample
        stats = {"time/sampling": t_sample, "time/reward_wait": t_wait,
                 "time/reward": sum(r[1] for r in results)}
        for name in self._component_means[0] if self._component_means else {}:
            stats[f"reward_component/{name}"] = float(np.mean([c[name] for c in self._component_means]))
        return self._assemble(batches, [r[0] for r in results], prompts_all, stats)

    # ------------------------------------------------------------------ advantages
    def _assemble(self, batches, queried, prompts_all, stats):
        """Dense rewards, returns and advantages; returns the process's EpochSamples."""
        cfg = self.cfg
        sdpo = cfg.train.method == "sdpo"
        traj_prompts: list[str] = []
        rewards_q, dense = [], []
        for bt, rq, prompts in zip(batches, queried, prompts_all, strict=True):
            traj_prompts += prompts * 2
            rewards_q.append(rq)
            if sdpo:
                dense.append(predict_dense_rewards(rq, bt["sims"], bt["anchor"], cfg.train.anchor,
                                                   cfg.train.dense_reward))
            else:
                dense.append(rq[:, -1:])
        per_traj = torch.cat(dense)  # (N, T) sdpo or (N, 1) ddpo, N = 2 * prompts of this process
        returns = discounted_returns(per_traj, cfg.train.gamma) if sdpo else per_traj
        all_returns = self.acc.gather(returns.to(self.acc.device)).cpu()
        all_prompts = gather_object(traj_prompts) if self.acc.num_processes > 1 else traj_prompts
        if self.stat_tracker is not None:
            adv_all = self.stat_tracker.update(list(all_prompts), all_returns)
        else:
            adv_all = batch_normalise(all_returns)
        n = returns.shape[0]
        adv = adv_all[self.acc.process_index * n:(self.acc.process_index + 1) * n]
        all_q = self.acc.gather(torch.cat(rewards_q).to(self.acc.device)).cpu()
        stats.update(self._reward_stats(all_q, sdpo))
        return self._split_items(batches, adv, sdpo), traj_prompts, stats

    @staticmethod
    def _reward_stats(all_q: torch.Tensor, sdpo: bool) -> dict[str, float]:
        stats = {"reward/last": float(all_q[:, -1].mean()), "reward/last_std": float(all_q[:, -1].std())}
        if sdpo:
            stats.update({"reward/first": float(all_q[:, 0].mean()), "reward/anchor": float(all_q[:, 1].mean())})
        return stats

    def _split_items(self, batches, adv: torch.Tensor, sdpo: bool) -> EpochSamples:
        """Regroup per-batch [traj 1 of B; traj 2 of B] tensors into trajectory-1 / trajectory-2 arrays."""
        t = self.cfg.sample.num_steps
        adv = adv.expand(-1, t) if adv.shape[1] == 1 else adv
        sizes = [bt["embeds"].shape[0] for bt in batches]
        adv_chunks = torch.split(adv, [2 * b for b in sizes])

        def halves(key_tensors: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
            first = torch.cat([x[:b] for x, b in zip(key_tensors, sizes, strict=True)])
            second = torch.cat([x[b:] for x, b in zip(key_tensors, sizes, strict=True)])
            return first, second

        embeds = torch.cat([bt["embeds"] for bt in batches])
        lat1, lat2 = halves([bt["latents"] for bt in batches])
        lp1, lp2 = halves([bt["log_probs"] for bt in batches])
        adv1, adv2 = halves(list(adv_chunks))
        if sdpo:
            return EpochSamples(embeds, [lat1, lat2], [lp1, lp2], [adv1, adv2])
        # DDPO: every trajectory is its own item
        return EpochSamples(torch.cat([embeds, embeds]), [torch.cat([lat1, lat2])],
                            [torch.cat([lp1, lp2])], [torch.cat([adv1, adv2])])

    # ------------------------------------------------------------------ training
    def _new_log_probs(self, s: EpochSamples, rows: torch.Tensor, steps: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Current-policy log-probs of items ``rows`` (b,) at steps ``steps`` (b,): one (b,) per
        trajectory of an item, from one UNet call over all of them."""
        cfg, dev = self.cfg, self.acc.device
        k = len(s.latents)
        x_t = torch.cat([lat[rows, steps] for lat in s.latents]).to(dev)
        x_prev = torch.cat([lat[rows, steps + 1] for lat in s.latents]).to(dev)
        t_cpu = self.timesteps[steps].repeat(k)  # ddim_step reads schedule values on the host
        t = t_cpu.to(dev)
        embeds = s.embeds[rows].repeat(k, 1, 1).to(dev)
        neg = self.negative_embed.expand(len(t), -1, -1) if self.negative_embed is not None else None
        out = guided_output(self._unet_fn(self.unet), x_t, t, embeds, cfg.sample.guidance_scale, neg)
        _, _, lp = ddim_step(self.ddim, out, t_cpu, x_t, cfg.sample.eta, prev_sample=x_prev)
        return lp.chunk(k)

    def _batch_loss(self, s: EpochSamples, rows: torch.Tensor, steps: torch.Tensor):
        """Loss of items ``rows`` (b,) at step indices ``steps`` (b,)."""
        dev, tr = self.acc.device, self.cfg.train
        lp_new = self._new_log_probs(s, rows, steps)
        lp_old = [p[rows, steps].to(dev) for p in s.log_probs]
        adv = [a[rows, steps].to(dev) for a in s.advantages]
        if len(lp_new) == 2:
            w = self.weights[steps].to(dev)
            return sdpo_loss(lp_new[0], lp_old[0], lp_new[1], lp_old[1], adv[0], adv[1], w,
                             tr.clip_range, tr.adv_clip_max)
        return ddpo_loss(lp_new[0], lp_old[0], adv[0], tr.clip_range, tr.adv_clip_max)

    @torch.no_grad()
    def _recompute_old_log_probs(self, s: EpochSamples, batches: list[torch.Tensor], step_perm: torch.Tensor,
                                 n_steps: int) -> None:
        """Score the sampled transitions again in the exact batch layout training will use.

        Half-precision UNet outputs depend on the batch composition; sigma_t is small at late steps,
        so sampling-time and training-time log-probs of the same transition can differ by far more
        than ``clip_range`` (measured on an H100 with bf16: approx KL 0.04 before any update). One
        extra no-grad forward per training item makes the ratio exactly 1 before the first update.
        """
        for j in range(n_steps):
            for rows in batches:
                steps = step_perm[rows, j]
                for old, new in zip(s.log_probs, self._new_log_probs(s, rows, steps), strict=True):
                    old[rows, steps] = new.float().cpu()

    def train_epoch(self, s: EpochSamples, epoch: int) -> dict[str, float]:
        cfg, acc = self.cfg, self.acc
        gen = torch.Generator().manual_seed(_seed(cfg.seed, epoch, acc.process_index, 3))
        m, t = s.embeds.shape[0], cfg.sample.num_steps
        n_steps = max(1, math.ceil(t * cfg.train.timestep_fraction))
        info: dict[str, list[torch.Tensor]] = defaultdict(list)
        self.unet.train()
        start = time.perf_counter()
        for inner in range(cfg.train.num_inner_epochs):
            order = torch.randperm(m, generator=gen) if cfg.train.shuffle_batch else torch.arange(m)
            if cfg.train.shuffle_timesteps:  # an independent permutation of the steps per item
                step_perm = torch.rand(m, t, generator=gen).argsort(dim=1)
            else:
                step_perm = torch.arange(t).expand(m, t)
            batches = list(order.split(cfg.train.batch_size))
            if inner == 0 and self.recompute_log_probs:
                self._recompute_old_log_probs(s, batches, step_perm, n_steps)
            bar = tqdm(total=n_steps * len(batches), desc=f"epoch {epoch}: training",
                       disable=not acc.is_local_main_process, leave=False)
            if self.per_step_updates:  # SDPO: step positions outer, an update every accumulation batches
                order_of_work = [(rows, j) for j in range(n_steps) for rows in batches]
            else:  # DDPO: each batch's trained steps in a row, accumulated into one update
                order_of_work = [(rows, j) for rows in batches for j in range(n_steps)]
            for rows, j in order_of_work:
                self._train_step(s, rows, step_perm[rows, j], info)
                bar.update()
            bar.close()
        metrics = {k: float(torch.stack([x.to("cpu") for x in v]).mean()) for k, v in info.items()}
        # before the first update the ratio must be 1: a non-zero value means sampling and training
        # score transitions differently (see train.recompute_log_probs)
        metrics["check/first_batch_kl"] = float(info["approx_kl"][0])
        metrics["time/training"] = time.perf_counter() - start
        return metrics

    def _train_step(self, s, rows, steps, info) -> None:
        acc = self.acc
        with acc.accumulate(self.unet):
            loss, diag = self._batch_loss(s, rows, steps)
            acc.backward(loss)
            if acc.sync_gradients:
                norm = acc.clip_grad_norm_(self.trainable, self.cfg.train.max_grad_norm)
                info["grad_norm"].append(torch.as_tensor(norm).detach().float())
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        # kept as tensors and averaged once per epoch: a float() here would wait on the GPU every step
        info["loss"].append(loss.detach().float())
        for k, v in diag.items():
            info[k].append(v.float())
        if acc.sync_gradients:
            self.global_step += 1
            if self.on_optimizer_step is not None:
                self.on_optimizer_step(self)

    # ------------------------------------------------------------------ checkpoints
    def trainable_state(self) -> dict[str, torch.Tensor]:
        """A CPU copy of the trained weights (LoRA in peft's naming, or the full UNet state)."""
        if self.lora_params is not None:
            return {k: p.detach().to("cpu", copy=True) for k, p in self.lora_params.items()}
        return _to_cpu_copy(self.acc.unwrap_model(self.unet).state_dict())

    def save_checkpoint(self, epoch: int) -> Path | None:
        """Snapshot the training state (copies) and write it, in the background when
        ``train.async_checkpoint``; ``wait_checkpoints`` blocks until it is on disk."""
        self.acc.wait_for_everyone()
        if not self.acc.is_main_process:
            return None
        state = ckpt.CheckpointState(
            epoch=epoch, global_step=self.global_step, weights=self.trainable_state(),
            optimizer=_to_cpu_copy(self.optimizer.state_dict()),
            # the tracker lives on the CPU and its state_dict already returns copies
            tracker=self.stat_tracker.state_dict() if self.stat_tracker else None,
            rng={"torch": torch.get_rng_state()}, config_yaml=self.config_yaml,
        )
        return self.checkpoints.submit(self.run_dir, state, self.cfg.train.keep_checkpoints)

    def wait_checkpoints(self) -> None:
        """Block until the last checkpoint is written (re-raises a failed write)."""
        self.checkpoints.wait()

    def load_checkpoint(self, path: Path) -> int:
        state = ckpt.load_checkpoint(path)
        unet = self.acc.unwrap_model(self.unet)
        if self.cfg.model.finetune == "lora":
            result = set_peft_model_state_dict(unet, state.weights)
            if getattr(result, "unexpected_keys", None):
                raise ResumeError(f"{path}: checkpoint LoRA keys do not match this model")
        else:
            unet.load_state_dict(state.weights)
        self.optimizer.load_state_dict(state.optimizer)
        if self.stat_tracker is not None and state.tracker is not None:
            self.stat_tracker.load_state_dict(state.tracker)
        torch.set_rng_state(state.rng["torch"])
        self.global_step = state.global_step
        return state.epoch + 1

    # ------------------------------------------------------------------ the loop
    def run(self, resume: bool = False) -> Path:
        cfg, acc = self.cfg, self.acc
        start_epoch = self._prepare_run_dir(resume)
        if acc.is_main_process:
            self.tracker.bind_run_dir(self.run_dir)  # what MLflow misses while down waits there
            self.tracker.log_params(cfg.to_dict())
        log.info("batch plan: %s", self.plan)
        try:
            for epoch in range(start_epoch, cfg.train.epochs):
                t0 = time.perf_counter()
                samples, _, stats = self.sample_epoch(epoch)
                stats.update(self.train_epoch(samples, epoch))
                stats["time/epoch"] = time.perf_counter() - t0
                stats["epoch"] = epoch
                if (epoch + 1) % cfg.train.checkpoint_every == 0 or epoch + 1 == cfg.train.epochs:
                    self.save_checkpoint(epoch)
                self._log_epoch(epoch, stats)
        except BaseException:
            # an interrupted epoch keeps the checkpoint already being written (resume starts there)
            self.checkpoints.close()
            raise
        return self._finish()

    def _prepare_run_dir(self, resume: bool) -> int:
        latest = ckpt.latest_checkpoint(self.run_dir)
        if resume and latest is None:
            log.warning("--resume: no checkpoint in %s, starting from scratch", self.run_dir)
        if not resume and latest is not None:
            raise ResumeError(
                f"{self.run_dir} already holds checkpoints (latest {latest.name}); pass --resume to continue "
                "it, or choose another --run-dir"
            )
        start = self.load_checkpoint(latest) if (resume and latest is not None) else 0
        if self.acc.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(self.config_yaml)
            if start:
                log.info("resumed from %s: starting at epoch %d", latest, start)
        return start

    def _log_epoch(self, epoch: int, stats: dict[str, float]) -> None:
        if not self.acc.is_main_process:
            return
        with open(self.run_dir / "train_metrics.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps(stats) + "\n")
        self.tracker.log_metrics({k: v for k, v in stats.items() if k != "epoch"}, step=epoch)
        r = " ".join(f"{k.split('/')[1]}={stats[k]:.4f}" for k in ("reward/first", "reward/anchor", "reward/last")
                     if k in stats)
        log.info("epoch %d: %s loss=%.4g kl=%.2e clipfrac=%.3f grad_norm=%.3g time: sample %.1fs reward %.1fs "
                 "train %.1fs", epoch, r, stats.get("loss", float("nan")), stats.get("approx_kl", float("nan")),
                 stats.get("clipfrac", float("nan")), stats.get("grad_norm", float("nan")),
                 stats["time/sampling"], stats["time/reward"], stats["time/training"])

    def _finish(self) -> Path:
        self.checkpoints.close()
        self.acc.wait_for_everyone()
        self.executor.shutdown()
        final = self.run_dir / "final"
        if self.acc.is_main_process:
            unet = self.acc.unwrap_model(self.unet)
            save_trained_model(unet, final, self.cfg.model.finetune, base=self.cfg.model.pretrained)
            self.tracker.log_artifact(self.run_dir / "config.yaml")
        self.acc.wait_for_everyone()
        return final


def train(cfg: Config, run_dir: str | Path, resume: bool = False, tracker: Tracker | None = None,
          **kwargs) -> Path:
    """Train ``cfg`` into ``run_dir``; returns ``run_dir/final``."""
    return Trainer(cfg, run_dir, tracker=tracker, **kwargs).run(resume=resume)
