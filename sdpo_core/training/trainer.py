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
import shutil
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

from sdpo_core.training import checkpoint as ckpt
from sdpo_core.rl.advantages import PerStepPromptStatTracker
from sdpo_core.rundir.atomic import atomic_write_text, replace_dir
from sdpo_core.training.checkpoint import ResumeError
from sdpo_core.config import Config, batch_plan, dump_yaml, micro_steps_per_update, resolve_update_schedule
from sdpo_core.families.family import Conditioning
from sdpo_core.families.loading import DTYPES, load_for_config
from sdpo_core.families.loading import save_trained as save_trained_model
from sdpo_core.families.lora import add_lora, lora_param_keys
from sdpo_core.rl.losses import temporal_weights
from sdpo_core.methods import build_method
from sdpo_core.evaluation.plots import save_image_grid
from sdpo_core.rewards import build_reward, check_rewards
from sdpo_core.rundir.lock import run_lock
from sdpo_core.sampling import build_policy, denoiser_caller, guided_output
from sdpo_core.tracking.trackers import NullTracker, Tracker

log = logging.getLogger(__name__)
# x0 states the VAE decodes per call in the reward job
DECODE_CHUNK = 8
# trajectories shown in the sample grid of a logging epoch (tracking.log_images_every)
GRID_TRAJECTORIES = 4
# pre-update approx KL above which sampling and training disagree (float32 agrees to ~1e-12)
KL_WARN = 1e-6


def _to_cpu_copy(obj):
    """A copy of ``obj`` (nested dicts / lists / tuples of tensors) that owns CPU memory."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu_copy(v) for v in obj)
    return obj


def _epoch_of(metrics_line: str) -> float:
    try:
        return json.loads(metrics_line)["epoch"]
    except (ValueError, KeyError, TypeError):
        return math.inf


def _seed(*parts: int) -> int:
    """Deterministic 63-bit seed from integers (seed, epoch, process, stream)."""
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (p & 0xFFFFFFFF)) * 1099511628211) % (1 << 63)
    return h


@dataclass
class EpochSamples:
    """One process's samples of an epoch. M items: pairs (sdpo) or trajectories (ddpo, grpo)."""

    cond: Conditioning  # M rows: the prompt conditioning of each item
    latents: list[torch.Tensor]  # one (M, T+1, C, H, W) per trajectory of an item (2 for sdpo)
    log_probs: list[torch.Tensor]  # one (M, T) per trajectory
    advantages: list[torch.Tensor] = field(default_factory=list)  # one (M, T) per trajectory
    prompts: list[str] = field(default_factory=list)  # M: the prompt of each item


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
        self.reward_fn = build_reward(  # model_dir: rewards that ship with the base model find it there
            cfg.reward.name, cfg.reward.options, self.acc.device, self.infer_dtype, model_dir=cfg.model.pretrained
        )
        self.method = build_method(cfg.train, cfg.sample.num_steps)
        st = cfg.train.stat_tracking
        self.stat_tracker = (PerStepPromptStatTracker(st.buffer_size, st.min_count, self.method.tracked_steps)
                             if st.enabled and self.method.uses_stat_tracker else None)
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
        m = cfg.model
        self.family = load_for_config(m, acc.device, self.infer_dtype, cfg.sample.resolution)
        self.pipe = self.family.pipe
        unet = self.family.denoiser  # a UNet or a transformer: the trainer only calls it through the family
        torch.manual_seed(cfg.seed)  # LoRA init: the same in every process and every run of a config
        if cfg.model.finetune == "lora":
            unet.to(dtype=self.infer_dtype)
            targets = m.lora_target_modules or list(self.family.default_lora_targets)
            add_lora(unet, m.lora_rank, m.lora_alpha, targets, self.family.lora_exclude_modules())
        else:
            unet.requires_grad_(True)
        if cfg.model.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
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
        self.latent_shape = self.family.latent_shape(cfg.sample.resolution)
        # the sampling policy that evaluation and `sdpo generate` rebuild the same way (build_policy)
        self.policy = build_policy(self.family, self._denoise_fn(unet), cfg.sample.num_steps, cfg.sample,
                                   cfg.model, self.latent_shape)
        self.sampler, self.timesteps = self.policy.sampler, self.policy.timesteps

    def _denoise_fn(self, model: torch.nn.Module) -> Callable:
        return denoiser_caller(self.family, model, self.infer_dtype, self.acc.autocast)

    # ------------------------------------------------------------------ sampling + rewards
    def _reward_job(self, x0: torch.Tensor, steps: torch.Tensor, prompts: list[str],
                    grid: int = 0) -> tuple[torch.Tensor, float, dict[str, float], torch.Tensor | None]:
        """Decode x0 at the queried steps and score them; runs in the worker thread.

        x0: (N, T, C, H, W); steps: (N, Q) step indices; prompts: N, one per trajectory. Returns
        (N, Q) rewards, busy seconds, the mean of each component of a combined reward, and, when
        ``grid`` > 0, the first-step and final x0 images of the first ``grid`` trajectories as
        (2, grid, 3, H, W) uint8 (for the sample grid; decoded again only where not queried). Each
        distinct (trajectory, step) is decoded and scored once (T = 1 or 2 repeat steps).
        """
        start = time.perf_counter()
        n, t = x0.shape[:2]
        flat = (torch.arange(n)[:, None] * t + steps).flatten()
        unique, inverse = torch.unique(flat, return_inverse=True)
        # decoded in chunks: at 1024 px a whole batch's queried states would take tens of GB at once
        picked = x0.flatten(0, 1)[unique]
        images = torch.cat([self.family.decode(c.to(self.acc.device)) for c in picked.split(DECODE_CHUNK)])
        item_prompts = [prompts[int(i) // t] for i in unique]
        values = check_rewards(self.cfg.reward.name, self.reward_fn(images, item_prompts), len(unique))
        # combined rewards expose each component's values of the last call: log their means
        parts = getattr(self.reward_fn, "last_components", None) or {}
        components = {k: float(v.float().mean()) for k, v in parts.items()}
        panel = None
        if grid:
            where = {int(f): j for j, f in enumerate(unique)}
            tiles = []
            for step in (0, t - 1):
                for i in range(min(grid, n)):
                    j = where.get(i * t + step)
                    tiles.append(images[j] if j is not None else self.family.decode(
                        x0[i, step][None].to(self.acc.device))[0])
            panel = (torch.stack(tiles).clamp(0, 1) * 255).round().to(torch.uint8).cpu()
            panel = panel.reshape(2, min(grid, n), *panel.shape[1:])
        return values.cpu()[inverse].reshape(steps.shape), time.perf_counter() - start, components, panel

    def _sample_batch(self, prompts: list[str], gen: torch.Generator, grid: int = 0) -> tuple[dict, Future]:
        b = len(prompts)
        paired = self.method.paired
        cond = self.family.encode(prompts)
        noise = torch.randn((b if paired else 2 * b, *self.latent_shape), generator=gen)
        model = self.acc.unwrap_model(self.unet)
        model.eval()
        traj = self.policy.sample_pairs(cond, noise.to(self.acc.device), gen, paired=paired)
        steps, extras = self.method.scored_steps(traj.x0)
        future = self.executor.submit(self._reward_job, traj.x0.cpu(), steps, prompts * 2, grid)
        out = {"cond": cond.cpu(), "latents": traj.latents.cpu(), "log_probs": traj.log_probs.cpu(),
               "extras": extras, "prompts": prompts}
        return out, future

    def sample_epoch(self, epoch: int) -> tuple[EpochSamples, list[str], dict[str, float]]:
        cfg, rank = self.cfg, self.acc.process_index
        gen = torch.Generator().manual_seed(_seed(cfg.seed, epoch, rank, 1))
        prompt_rng = np.random.default_rng(_seed(cfg.seed, epoch, rank, 2))
        batches, futures, prompts_all = [], [], []
        # the sample grid: the first batch's first trajectories, on the main process, every N epochs
        grid = GRID_TRAJECTORIES if self.acc.is_main_process and epoch % cfg.tracking.log_images_every == 0 else 0
        t0 = time.perf_counter()
        epoch_prompts = self.method.epoch_prompts(prompt_rng, self.train_prompts, cfg.sample.num_batches_per_epoch,
                                                  cfg.sample.batch_size)
        for k, prompts in enumerate(tqdm(epoch_prompts, desc=f"epoch {epoch}: sampling",
                                         disable=not self.acc.is_local_main_process, leave=False)):
            out, fut = self._sample_batch(prompts, gen, grid if k == 0 else 0)
            batches.append(out)
            futures.append(fut)
            prompts_all.append(prompts)
        t_sample = time.perf_counter() - t0
        results = [f.result() for f in futures]
        t_wait = time.perf_counter() - t0 - t_sample
        stats = {"time/sampling": t_sample, "time/reward_wait": t_wait,
                 "time/reward": sum(r[1] for r in results)}
        for name in results[0][2] if results else {}:
            stats[f"reward_component/{name}"] = float(np.mean([r[2][name] for r in results]))
        if results[0][3] is not None:
            self._log_sample_grid(epoch, results[0][3], results[0][0], prompts_all[0] * 2)
        return self._assemble(batches, [r[0] for r in results], prompts_all, stats)

    def _log_sample_grid(self, epoch: int, panel: torch.Tensor, rewards: torch.Tensor, prompts: list[str]) -> None:
        """RUN_DIR/samples/epoch_NNNN.png (first-step and final x0 with their rewards and prompts),
        logged to the tracker under ``samples/``. panel: (2, K, 3, H, W); rewards: (N, Q) queried."""
        k = panel.shape[1]
        cols = []
        for i in range(k):
            # SDPO queries the first step (column 0); DDPO only the final one
            first = f"{float(rewards[i, 0]):.3f}" if rewards.shape[1] > 1 else "-"
            cols.append(f"r {first} -> {float(rewards[i, -1]):.3f}: {prompts[i]}")
        out = self.run_dir / "samples" / f"epoch_{epoch:04d}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        save_image_grid({f"epoch {epoch}": panel}, ["first-step x0", "final x0"], cols, out)
        self.tracker.log_artifact(out, artifact_path="samples")

    # ------------------------------------------------------------------ advantages
    def _assemble(self, batches, queried, prompts_all, stats):
        """Dense rewards, returns and advantages; returns the process's EpochSamples."""
        traj_prompts: list[str] = []
        for prompts in prompts_all:
            traj_prompts += prompts * 2
        # (N, T) dense returns (sdpo) or (N, 1) final rewards (ddpo, grpo), N = 2 * prompts of this process
        returns = torch.cat([self.method.returns(rq, bt["extras"]) for bt, rq in zip(batches, queried, strict=True)])
        all_returns = self.acc.gather(returns.to(self.acc.device)).cpu()
        all_prompts = gather_object(traj_prompts) if self.acc.num_processes > 1 else traj_prompts
        adv_all = self.method.advantages(list(all_prompts), all_returns, self.stat_tracker)
        n = returns.shape[0]
        adv = adv_all[self.acc.process_index * n:(self.acc.process_index + 1) * n]
        all_q = self.acc.gather(torch.cat(queried).to(self.acc.device)).cpu()
        stats.update(self.method.reward_stats(all_q))
        return self._split_items(batches, adv), traj_prompts, stats

    def _split_items(self, batches, adv: torch.Tensor) -> EpochSamples:
        """Regroup per-batch [traj 1 of B; traj 2 of B] tensors into trajectory-1 / trajectory-2 arrays."""
        t = self.cfg.sample.num_steps
        adv = adv.expand(-1, t) if adv.shape[1] == 1 else adv
        sizes = [len(bt["cond"]) for bt in batches]
        adv_chunks = torch.split(adv, [2 * b for b in sizes])

        def halves(key_tensors: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
            first = torch.cat([x[:b] for x, b in zip(key_tensors, sizes, strict=True)])
            second = torch.cat([x[b:] for x, b in zip(key_tensors, sizes, strict=True)])
            return first, second

        cond = Conditioning.cat([bt["cond"] for bt in batches])
        lat1, lat2 = halves([bt["latents"] for bt in batches])
        lp1, lp2 = halves([bt["log_probs"] for bt in batches])
        adv1, adv2 = halves(list(adv_chunks))
        prompts = [p for bt in batches for p in bt["prompts"]]
        if self.method.trajectories_per_item == 2:
            return EpochSamples(cond, [lat1, lat2], [lp1, lp2], [adv1, adv2], prompts)
        # every trajectory is its own item
        return EpochSamples(cond.repeat(2), [torch.cat([lat1, lat2])],
                            [torch.cat([lp1, lp2])], [torch.cat([adv1, adv2])], prompts + prompts)

    # ------------------------------------------------------------------ training
    def _new_log_probs(self, s: EpochSamples, rows: torch.Tensor, steps: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Current-policy log-probs of items ``rows`` (b,) at steps ``steps`` (b,): one (b,) per
        trajectory of an item, from one UNet call over all of them."""
        cfg, dev = self.cfg, self.acc.device
        k = len(s.latents)
        x_t = torch.cat([lat[rows, steps] for lat in s.latents]).to(dev)
        x_prev = torch.cat([lat[rows, steps + 1] for lat in s.latents]).to(dev)
        index = steps.repeat(k)  # step indices stay on the host: the sampler reads its schedule there
        cond = s.cond[rows].repeat(k).to(dev)
        neg = self.policy.negatives(len(index))
        out = guided_output(self._denoise_fn(self.unet), x_t, self.timesteps[index], cond,
                            cfg.sample.guidance_scale, neg)
        _, _, lp = self.sampler.step(out, index, x_t, prev_sample=x_prev)
        return lp.chunk(k)

    def _batch_loss(self, s: EpochSamples, rows: torch.Tensor, steps: torch.Tensor):
        """Loss of items ``rows`` (b,) at step indices ``steps`` (b,)."""
        dev = self.acc.device
        lp_new = list(self._new_log_probs(s, rows, steps))
        lp_old = [p[rows, steps].to(dev) for p in s.log_probs]
        adv = [a[rows, steps].to(dev) for a in s.advantages]
        return self.method.loss(lp_new, lp_old, adv, self.weights[steps].to(dev))

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
        m, t = len(s.cond), cfg.sample.num_steps
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
        if metrics["check/first_batch_kl"] > KL_WARN and not self.recompute_log_probs:
            log.warning("epoch %d: approx KL %.3g before the first update (want ~0): sampling and training "
                        "score transitions differently on this device; set train.recompute_log_probs=always",
                        epoch, metrics["check/first_batch_kl"])
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
        try:
            if self.cfg.model.finetune == "lora":
                result = set_peft_model_state_dict(unet, state.weights)
                if getattr(result, "unexpected_keys", None):
                    raise ResumeError(f"{path}: checkpoint LoRA keys do not match this model")
            else:
                unet.load_state_dict(state.weights)
            self.optimizer.load_state_dict(state.optimizer)
            if self.stat_tracker is not None and state.tracker is not None:
                self.stat_tracker.load_state_dict(state.tracker)
        except (RuntimeError, ValueError, KeyError) as exc:
            if isinstance(exc, ResumeError):
                raise
            # a change check_compatible does not know about: still one message, not a traceback
            raise ResumeError(
                f"{path} does not fit this run's model or optimizer ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0]}); compare {path / 'config.yaml'} with this run's config, "
                "or start a new run with another --run-dir"
            ) from exc
        torch.set_rng_state(state.rng["torch"])
        self.global_step = state.global_step
        return state.epoch + 1

    # ------------------------------------------------------------------ the loop
    def run(self, resume: bool = False) -> Path:
        with run_lock(self.run_dir):  # re-entrant: the CLI and the flow already hold it
            return self._run(resume)

    def _run(self, resume: bool) -> Path:
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
                # metrics first: a stop between the two retrains this epoch (its line is dropped on
                # resume); the other order would lose the metrics of a checkpointed epoch for good
                self._log_epoch(epoch, stats)
                if (epoch + 1) % cfg.train.checkpoint_every == 0 or epoch + 1 == cfg.train.epochs:
                    self.save_checkpoint(epoch)
        except BaseException:
            # an interrupted epoch keeps the checkpoint already being written (resume starts there)
            self.checkpoints.close()
            raise
        return self._finish()

    def _prepare_run_dir(self, resume: bool) -> int:
        """Check the run dir (ResumeError before anything is written), load the checkpoint to resume."""
        latest, bad = ckpt.plan_resume(self.run_dir, self.config_yaml, resume)
        if resume and latest is None:
            log.warning("--resume: no checkpoint in %s, starting from scratch", self.run_dir)
        start = self.load_checkpoint(latest) if latest is not None else 0
        self.acc.wait_for_everyone()  # every process has read the checkpoints before any is renamed
        if self.acc.is_main_process:
            for path, problem in bad:  # newer than `latest` and unusable: out of resume's (and pruning's) way
                log.warning("skipping checkpoint %s: %s; moved to %s", path, problem, ckpt.set_aside(path).name)
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(self.config_yaml)
            if start:
                self._drop_metrics_from(start)
                log.info("resumed from %s: starting at epoch %d", latest, start)
        return start

    def _drop_metrics_from(self, epoch: int) -> None:
        """Forget metrics lines of epochs >= ``epoch`` (logged before a stop, trained again now)."""
        path = self.run_dir / "train_metrics.jsonl"
        if not path.is_file():
            return
        lines = [x for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]
        kept = [x for x in lines if _epoch_of(x) < epoch]  # a half-written last line goes too
        if len(kept) < len(lines):
            atomic_write_text(path, "".join(x + "\n" for x in kept))

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
            tmp = final.with_name("final.tmp")  # written aside and renamed: never a half `final/`
            if tmp.exists():
                shutil.rmtree(tmp)
            m = self.cfg.model
            save_trained_model(self.family, unet, tmp, m.finetune, base=m.pretrained, base_lora=m.base_lora,
                               base_lora_scale=m.base_lora_scale)
            replace_dir(tmp, final)
            self.tracker.log_artifact(self.run_dir / "config.yaml")
        self.acc.wait_for_everyone()
        return final

