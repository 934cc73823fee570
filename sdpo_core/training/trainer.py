"""The online RL loop: sample trajectories, score them, update the denoiser (a UNet or a transformer).

Run it with ``sdpo train --pipeline NAME``; for several GPUs (or two CPU processes) start the
same command under ``accelerate launch`` / ``torchrun``: every process samples its own prompts
and noise (per-process seeds), rewards and prompts are gathered so that all processes hold the
same stat tracker, gradients are averaged by accelerate, the epoch's metrics are gathered over the
processes (``distributed.py``), and only the main process writes.
Launched with an FSDP accelerate config, the denoiser is sharded over the processes
(``sharding.py``): checkpoints are then written by every process, each its own shard.

``Trainer.run`` (the method decides k, the x_T sharing, the scored steps, advantages and loss):
  0. prepare the run dir: check it, resume from the newest good checkpoint (``run_state.py``);
  per epoch:
  1. sample ``sample.num_batches_per_epoch`` batches of B prompts, k trajectories each
     (``rollout.py``), recording x_t, x0_t and log-probs per step;
  2. while the next batch samples, a worker thread decodes the method's queried x0 states and
     scores them (``scoring.py``);
  3. returns -> advantages (gathered over processes), regrouped into the method's training items;
  4. updates in the update schedule's order (``update.py``); a non-finite one is skipped, or stops
     the run naming the last good checkpoint (``nonfinite.py``);
  5. log the metrics line, then checkpoint (atomic, in the background);
  6. at the end, save the trained model to RUN_DIR/final.
Hooks into each of these: ``callbacks.TrainerCallback``.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import torch
from accelerate import Accelerator

from sdpo_core.config import Config, batch_plan, dump_yaml, micro_steps_per_update, resolve_update_schedule
from sdpo_core.evaluation.plots import save_image_grid
from sdpo_core.families.loading import DTYPES, check_model_sources, load_for_config
from sdpo_core.families.loading import save_trained as save_trained_model
from sdpo_core.families.lora import add_lora, lora_param_keys, lora_state_dict, skip_lora_input_casts
from sdpo_core.methods import build_method
from sdpo_core.prompts import load_train_eval
from sdpo_core.rewards import build_reward
from sdpo_core.rl.advantages import PerStepPromptStatTracker
from sdpo_core.rundir.atomic import replace_dir
from sdpo_core.rundir.lock import run_lock
from sdpo_core.sampling import DenoiseFn, build_policy, denoiser_caller
from sdpo_core.tracking.trackers import NullTracker, Tracker
from sdpo_core.training import checkpoint as ckpt
from sdpo_core.training import run_state, sharding
from sdpo_core.training.callbacks import CallbackList, TrainerCallback
from sdpo_core.training.distributed import gathered_metrics, weights_digest
from sdpo_core.training.nonfinite import NonFiniteError
from sdpo_core.training.prompt_cache import PromptEmbeddings, free_text_encoders
from sdpo_core.training.rollout import EpochRollout, EpochSamples, Rollout
from sdpo_core.training.scoring import RewardJob
from sdpo_core.training.update import Updater
from sdpo_core.training.warm_start import warm_start
from sdpo_core.training.weights import PolicyWeights

log = logging.getLogger(__name__)
# trajectories shown in the sample grid of a logging epoch (tracking.log_images_every)
GRID_TRAJECTORIES = 4


class Trainer:
    def __init__(
        self,
        cfg: Config,
        run_dir: str | Path,
        tracker: Tracker | None = None,
        accelerator: Accelerator | None = None,
        callbacks: list[TrainerCallback] | None = None,
        train_prompts: list[str] | None = None,
    ) -> None:
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.acc = accelerator or Accelerator(
            mixed_precision=cfg.model.mixed_precision, cpu=not torch.cuda.is_available(),
        )
        # backward passes per optimizer step: accumulation batches (x the trained steps per_trajectory)
        self.acc.gradient_accumulation_steps = micro_steps_per_update(cfg)
        sharding.check_supported(self.acc)
        self.plan = batch_plan(cfg, self.acc.num_processes)
        self.tracker = tracker if (tracker is not None and self.acc.is_main_process) else NullTracker()
        self.callbacks = CallbackList(callbacks or [])
        self.infer_dtype = DTYPES[self.acc.mixed_precision] if self.acc.mixed_precision != "no" else torch.float32
        # everything that can fail on the user's input (prompts, reward weights, the LoRA to fuse)
        # before the diffusion model loads (or downloads)
        if train_prompts is None:
            train_prompts, _ = load_train_eval(cfg.prompts.source, cfg.prompts.eval_fraction, cfg.prompts.seed)
        if not train_prompts:
            raise ValueError("no training prompts")
        self.train_prompts = list(train_prompts)
        check_model_sources(cfg.model)
        self.reward_fn = build_reward(  # model_dir: rewards that ship with the base model find it there
            cfg.reward.name, cfg.reward.options, self.acc.device, self.infer_dtype, model_dir=cfg.model.pretrained
        )
        self._setup_model()
        self.method = build_method(cfg.train, cfg.sample.num_steps)
        # copies of the weights training starts from: the method's (old policy, KL reference) and the EMA
        named = self.acc.unwrap_model(self.denoiser).named_parameters()
        self.weights = PolicyWeights({n: p for n, p in named if p.requires_grad}, self.method.policies(),
                                     cfg.train.ema_decay)
        sharding.check_weight_copies(sharding.is_sharded(self.acc), list(self.weights.snapshots))
        st = cfg.train.stat_tracking
        self.stat_tracker = (PerStepPromptStatTracker(st.buffer_size, st.min_count, self.method.tracked_steps)
                             if st.enabled and self.method.uses_stat_tracker else None)
        score = RewardJob(self.family.decode, self.reward_fn, cfg.reward.name, self.acc.device)
        encode = None
        if cfg.model.cache_prompt_embeddings:  # after build_policy encoded the empty prompt (CFG)
            encode = PromptEmbeddings(self.family, self.train_prompts, cfg.sample.batch_size)
            log.info("prompt embeddings cached; text encoders freed: %s", free_text_encoders(self.pipe))
        self.rollout = Rollout(cfg, self.acc, self.family, self.acc.unwrap_model(self.denoiser), self.policy,
                               self.method, score, self.stat_tracker, self.train_prompts, encode)
        self.updater = Updater(cfg, self.acc, self.denoiser, self.denoise_fn(self.denoiser), self.optimizer,
                               self.trainable, self.policy, self.method,
                               per_step=resolve_update_schedule(cfg.train) == "per_step",
                               on_optimizer_step=lambda: self.callbacks.on_optimizer_step(self), weights=self.weights)
        self.checkpoints = ckpt.CheckpointWriter(background=cfg.train.async_checkpoint)
        self.config_yaml = dump_yaml(cfg)

    # ------------------------------------------------------------------ set-up
    def _setup_model(self) -> None:
        cfg, acc, m = self.cfg, self.acc, self.cfg.model
        log.info("loading model %s", m.pretrained)
        # a LoRA trains over a frozen base in the compute dtype; a full fine-tune keeps float32 master weights
        denoiser_dtype = self.infer_dtype if m.finetune == "lora" else torch.float32
        self.family = load_for_config(m, acc.device, self.infer_dtype, cfg.sample.resolution, denoiser_dtype)
        self.pipe = self.family.pipe
        denoiser = self.family.denoiser  # a UNet or a transformer: the trainer only calls it through the family
        torch.manual_seed(cfg.seed)  # LoRA init: the same in every process and every run of a config
        if m.finetune == "lora":
            denoiser.to(dtype=self.infer_dtype)
            targets = m.lora_target_modules or list(self.family.default_lora_targets)
            add_lora(denoiser, m.lora_rank, m.lora_alpha, targets, self.family.lora_exclude_modules())
            if self.infer_dtype != torch.float32:  # every call of it runs under autocast (denoise_fn)
                skip_lora_input_casts(denoiser)
        else:
            denoiser.requires_grad_(True)
        if m.gradient_checkpointing:
            denoiser.enable_gradient_checkpointing()
        if m.compile:  # in place: the same module, parameters and state-dict keys (LoRA checkpoints)
            denoiser.compile()
        train = cfg.train
        # foreach: one multi-tensor kernel per update instead of a Python loop over the LoRA tensors
        # (torch picks it by itself only on CUDA); the same update rule
        optimizer = torch.optim.AdamW(
            sharding.trainable_parameters(denoiser), lr=train.learning_rate,
            betas=(train.adam_beta1, train.adam_beta2), weight_decay=train.adam_weight_decay, eps=train.adam_epsilon,
            foreach=True,
        )
        # checkpoint key -> live parameter, resolved once (peft's state-dict walk costs ms per call);
        # unsharded runs only: FSDP replaces the parameters, a sharded run's state goes through sharding.py
        self.lora_params = lora_param_keys(denoiser) if m.finetune == "lora" else None
        if m.init_from:  # after the random init: the same RNG draws as a cold start
            warm_start(m.init_from, m, self.family, self.lora_params or {}, shared_dir=self.run_dir)
        self.denoiser, self.optimizer = acc.prepare(denoiser, optimizer)
        # read after prepare: FSDP replaces every parameter with its shard
        self.trainable = sharding.trainable_parameters(self.denoiser)
        self.latent_shape = self.family.latent_shape(cfg.sample.resolution)
        # the sampling policy that evaluation and `sdpo generate` rebuild the same way (build_policy)
        self.policy = build_policy(self.family, self.denoise_fn(denoiser), cfg.sample.num_steps, cfg.sample,
                                   m, self.latent_shape)
        self.sampler, self.timesteps = self.policy.sampler, self.policy.timesteps

    def denoise_fn(self, model: torch.nn.Module) -> DenoiseFn:
        """The denoiser call of ``model`` (the prepared or the unwrapped denoiser) as training makes it."""
        return denoiser_caller(self.family, model, self.infer_dtype, self.acc.autocast)

    @property
    def global_step(self) -> int:
        """Optimizer steps taken in this run (continued from the checkpoint on resume)."""
        return self.updater.global_step

    # ------------------------------------------------------------------ one epoch
    def sample_epoch(self, epoch: int) -> EpochRollout:
        """Steps 1-3: the epoch's samples with their advantages, the prompts and the reward metrics."""
        grid = (GRID_TRAJECTORIES if self.acc.is_main_process and epoch % self.cfg.tracking.log_images_every == 0
                else 0)
        with self.weights.use(self.method.sampling_policy):  # the live weights, or e.g. NFT's old policy
            rollout = self.rollout.sample_epoch(epoch, grid, lambda scored: self.callbacks.on_rewards(self, epoch, scored))
        if rollout.first is not None and rollout.first.panel is not None:
            self._log_sample_grid(epoch, rollout.first.panel, rollout.first.rewards, rollout.prompts)
        return rollout

    def train_epoch(self, samples: EpochSamples, epoch: int) -> dict[str, float]:
        """Step 4: the updates of an epoch; returns its loss and diagnostics metrics."""
        return self.updater.train_epoch(samples, epoch)

    def _log_sample_grid(self, epoch: int, panel: torch.Tensor, rewards: torch.Tensor, prompts: list[str]) -> None:
        """RUN_DIR/samples/epoch_NNNN.png (first-step and final x0 with their rewards and prompts),
        logged to the tracker under ``samples/``. panel: (2, K, 3, H, W); rewards: (N, Q) queried."""
        cols = []
        for i in range(panel.shape[1]):
            # a method that queries the first step has it in column 0; one that scores only the last has one column
            first = f"{float(rewards[i, 0]):.3f}" if rewards.shape[1] > 1 else "-"
            cols.append(f"r {first} -> {float(rewards[i, -1]):.3f}: {prompts[i]}")
        out = self.run_dir / "samples" / f"epoch_{epoch:04d}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        save_image_grid({f"epoch {epoch}": panel}, ["first-step x0", "final x0"], cols, out)
        self.tracker.log_artifact(out, artifact_path="samples")

    # ------------------------------------------------------------------ checkpoints
    def trainable_state(self) -> dict[str, torch.Tensor]:
        """A CPU copy of the trained weights (LoRA in peft's naming, or the full denoiser state).
        Sharded (FSDP): gathered whole on the main process ({} on the others); every process calls it."""
        if sharding.is_sharded(self.acc):
            full = sharding.gather_trainable(self.denoiser)
            return lora_state_dict(self.denoiser, full) if self.lora_params is not None and full else full
        if self.lora_params is not None:
            return {k: p.detach().to("cpu", copy=True) for k, p in self.lora_params.items()}
        return run_state.to_cpu_copy(self.acc.unwrap_model(self.denoiser).state_dict())

    def save_checkpoint(self, epoch: int) -> Path | None:
        """Snapshot the training state (copies) and write it, in the background when
        ``train.async_checkpoint``; ``wait_checkpoints`` blocks until it is on disk. Every process
        calls it (sharded, each writes its shard first, in the foreground)."""
        self.acc.wait_for_everyone()
        sharded = sharding.is_sharded(self.acc)
        if sharded:  # every process writes its shard now; the main process the rest (below)
            self.checkpoints.wait()  # the previous checkpoint is complete before this one starts
            sharding.write_shards(self.run_dir, epoch, self.denoiser, self.optimizer, self.acc)
        if not self.acc.is_main_process:
            return None
        state = ckpt.CheckpointState(
            epoch=epoch, global_step=self.global_step, sharded=sharded,
            weights=None if sharded else self.trainable_state(),
            optimizer=None if sharded else run_state.to_cpu_copy(self.optimizer.state_dict()),
            # the tracker lives on the CPU and its state_dict already returns copies
            tracker=self.stat_tracker.state_dict() if self.stat_tracker else None,
            rng={"torch": torch.get_rng_state()}, config_yaml=self.config_yaml, snapshots=self.weights.state_dict(),
        )
        return self.checkpoints.submit(self.run_dir, state, self.cfg.train.keep_checkpoints)

    def wait_checkpoints(self) -> None:
        """Block until the last checkpoint is written (re-raises a failed write)."""
        self.checkpoints.wait()

    def load_checkpoint(self, path: Path) -> int:
        """Restore the training state of checkpoint ``path``; returns the epoch to continue at."""
        state = ckpt.load_checkpoint(path)
        run_state.check_sharding(path, state.sharded, sharding.is_sharded(self.acc))
        run_state.restore(path, state, self.acc.unwrap_model(self.denoiser), self.cfg.model.finetune,
                          self.optimizer, self.stat_tracker)
        self.weights.load_state_dict(state.snapshots, str(path))
        torch.set_rng_state(state.rng["torch"])
        self.updater.global_step = state.global_step
        return state.epoch + 1

    # ------------------------------------------------------------------ the loop
    def run(self, resume: bool = False) -> Path:
        """Train ``train.epochs`` epochs (from the newest checkpoint when ``resume``); returns RUN_DIR/final."""
        with run_lock(self.run_dir):  # re-entrant: the CLI and the flow already hold it
            return self._run(resume)

    def _run(self, resume: bool) -> Path:
        cfg, acc = self.cfg, self.acc
        # 0. the run dir, resumed
        start_epoch = run_state.prepare_run_dir(self.run_dir, self.config_yaml, resume, acc, self.load_checkpoint)
        if acc.is_main_process:
            self.tracker.bind_run_dir(self.run_dir)  # what MLflow misses while down waits there
            self.tracker.log_params(cfg.to_dict())
        log.info("batch plan: %s", self.plan)
        self.callbacks.on_run_start(self, start_epoch)
        try:
            for epoch in range(start_epoch, cfg.train.epochs):
                t0 = time.perf_counter()
                self.callbacks.on_epoch_start(self, epoch)
                rollout = self.sample_epoch(epoch)  # 1-3. sample, score, advantages
                metrics = rollout.stats
                metrics.update(self.train_epoch(rollout.samples, epoch))  # 4. update
                metrics["time/epoch"] = time.perf_counter() - t0
                metrics["epoch"] = epoch
                metrics = gathered_metrics(metrics)  # every rank's share (a collective)
                # 5. metrics first: a stop between the two retrains this epoch (its line is dropped on
                # resume); the other order would lose the metrics of a checkpointed epoch for good
                self._log_epoch(epoch, metrics)
                self.callbacks.on_epoch_end(self, epoch, metrics)
                if (epoch + 1) % cfg.train.checkpoint_every == 0 or epoch + 1 == cfg.train.epochs:
                    self.save_checkpoint(epoch)
        except NonFiniteError as exc:
            self.checkpoints.close()  # the checkpoint being written is the last good one: on disk first
            exc.checkpoint, exc.checkpoint_known = ckpt.latest_checkpoint(self.run_dir), True
            raise
        except BaseException:
            # an interrupted epoch keeps the checkpoint already being written (resume starts there)
            self.checkpoints.close()
            raise
        final = self._finish()  # 6. the trained model
        self.callbacks.on_run_end(self, final)
        return final

    def _log_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        if not self.acc.is_main_process:
            return
        run_state.append_metrics(self.run_dir, metrics)
        self.tracker.log_metrics({k: v for k, v in metrics.items() if k != "epoch"}, step=epoch)
        r = " ".join(f"{k.split('/')[1]}={metrics[k]:.4f}" for k in ("reward/first", "reward/anchor", "reward/last")
                     if k in metrics)
        log.info("epoch %d: %s loss=%.4g kl=%.2e clipfrac=%.3f grad_norm=%.3g time: sample %.1fs reward %.1fs "
                 "train %.1fs", epoch, r, metrics.get("loss", float("nan")), metrics.get("approx_kl", float("nan")),
                 metrics.get("clipfrac", float("nan")), metrics.get("grad_norm", float("nan")),
                 metrics["time/sampling"], metrics["time/reward"], metrics["time/training"])

    def close(self) -> None:
        """Wait for the checkpoint being written and stop the reward worker (``run`` does this itself)."""
        self.checkpoints.close()
        self.rollout.close()

    def _finish(self) -> Path:
        self.checkpoints.close()
        self.acc.wait_for_everyone()
        self.rollout.close()
        final = self.run_dir / "final"
        # sharded: the trained weights gathered whole on the main process (every process takes part)
        weights = self.trainable_state() if sharding.is_sharded(self.acc) else None
        if weights is None and log.isEnabledFor(logging.DEBUG):  # `sdpo -v`: each rank's own copy (they must agree)
            log.debug("rank %d: trained weights sha256 %s", self.acc.process_index, weights_digest(self.trainable_state()))
        if self.acc.is_main_process:
            denoiser = self.acc.unwrap_model(self.denoiser)
            if weights is not None and self.lora_params is None:  # a full fine-tune: an unsharded copy to save
                denoiser, weights = sharding.unsharded_copy(denoiser, weights), None
            tmp = final.with_name("final.tmp")  # written aside and renamed: never a half `final/`
            if tmp.exists():
                shutil.rmtree(tmp)
            m = self.cfg.model
            with self.weights.exported():  # the EMA when train.ema_decay keeps one (never under FSDP)
                save_trained_model(self.family, denoiser, tmp, m.finetune, base=m.pretrained, base_lora=m.base_lora,
                                   base_lora_scale=m.base_lora_scale, revision=m.revision,
                                   mixed_precision=m.mixed_precision, lora_weights=weights)
            replace_dir(tmp, final)
            self.tracker.log_artifact(self.run_dir / "config.yaml")
        self.acc.wait_for_everyone()
        return final
