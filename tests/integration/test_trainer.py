"""The trainer on a tiny real diffusers pipeline: log-probs, parameter updates, DDPO, exact resume."""

from __future__ import annotations

import pytest
import torch

from sdpo_core.training.callbacks import TrainerCallback
from sdpo_core.training.checkpoint import checkpoint_dirs
from sdpo_core.training.trainer import Trainer


class OnStep(TrainerCallback):
    """Calls ``fn(trainer)`` after every optimizer step."""

    def __init__(self, fn):
        self.fn = fn

    def on_optimizer_step(self, trainer):
        self.fn(trainer)


def _frozen_and_lora(trainer: Trainer):
    unet = trainer.acc.unwrap_model(trainer.denoiser)
    lora = {n: p.detach().clone() for n, p in unet.named_parameters() if "lora" in n}
    base = {n: p.detach().clone() for n, p in unet.named_parameters() if "lora" not in n}
    others = {f"vae.{n}": p.detach().clone() for n, p in trainer.pipe.vae.named_parameters()}
    others.update({f"text.{n}": p.detach().clone() for n, p in trainer.pipe.text_encoder.named_parameters()})
    return lora, base, others


def test_recomputed_log_probs_equal_sampled_ones(tiny_cfg, tmp_path):
    tr = Trainer(tiny_cfg("sample.num_steps=3"), tmp_path)
    samples = tr.sample_epoch(0).samples
    dev = tr.acc.device
    for j in range(3):
        # the same batch layout as sampling ([traj 1; traj 2]) gives bit-identical log-probs
        x_t = torch.cat([lat[:, j] for lat in samples.latents]).to(dev)
        prev = torch.cat([lat[:, j + 1] for lat in samples.latents]).to(dev)
        cond = samples.cond.repeat(2).to(dev)
        index = torch.full((len(x_t),), j)
        with torch.no_grad():
            out = tr.policy.output(x_t, index, cond)
        _, _, lp = tr.sampler.step(out, index, x_t, prev_sample=prev)
        old = torch.cat([p[:, j] for p in samples.log_probs]).to(dev)
        assert torch.equal(lp, old), f"step {j}: ratio != 1 before any update"
    # the two trajectories of a pair start from the same x_T and then differ
    assert torch.equal(samples.latents[0][:, 0], samples.latents[1][:, 0])
    assert not torch.equal(samples.latents[0][:, -1], samples.latents[1][:, -1])


def test_training_batches_score_log_probs_as_sampled(tiny_cfg, tmp_path):
    # through the training path (shuffled steps, other batch sizes) the ratio is 1 up to float error
    tr = Trainer(tiny_cfg(), tmp_path)
    samples = tr.sample_epoch(0).samples
    rows, steps = torch.tensor([2, 0]), torch.tensor([1, 0])
    with torch.no_grad():
        loss, info = tr.updater.batch_loss(samples, rows, steps)
    assert info["approx_kl"].item() < 1e-10


@pytest.mark.parametrize("method,schedule", [("sdpo", "auto"), ("ddpo", "auto"), ("sdpo", "per_trajectory"),
                                             ("ddpo", "per_step"), ("grpo", "auto")])
def test_two_epochs_update_every_lora_weight_and_nothing_else(tiny_cfg, tmp_path, method, schedule):
    updates = []
    tr = Trainer(tiny_cfg(f"train.method={method}", f"train.update_schedule={schedule}",
                          "sample.num_steps=3", "train.grpo.group_size=4"), tmp_path,
                 callbacks=[OnStep(lambda t: updates.append(t.global_step))])
    lora0, base0, others0 = _frozen_and_lora(tr)
    assert lora0, "no LoRA parameters were added"
    final = tr.run()
    lora1, base1, others1 = _frozen_and_lora(tr)
    unchanged = [n for n in lora0 if torch.equal(lora0[n], lora1[n])]
    assert not unchanged, f"LoRA parameters not updated: {unchanged[:5]}"
    assert all(torch.equal(base0[n], base1[n]) for n in base0)
    assert all(torch.equal(others0[n], others1[n]) for n in others0)
    assert (final / "pytorch_lora_weights.safetensors").is_file()
    assert [d.name for d in checkpoint_dirs(tmp_path)] == ["epoch_0000", "epoch_0001"]
    lines = (tmp_path / "train_metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 and "reward/last" in lines[0] and "time/training" in lines[0]
    # the optimizer steps the batch plan promises: per step position (SDPO's loop) or per batch
    # with its 3 steps accumulated (DDPO's loop)
    per_epoch = tr.plan.optimizer_steps_per_epoch
    batches = tr.plan.train_batches_per_process
    expected = 3 * batches if (method, schedule) in {("sdpo", "auto"), ("ddpo", "per_step")} else batches
    assert per_epoch == expected and updates == list(range(1, 2 * per_epoch + 1))


def test_full_finetune_updates_unet(tiny_cfg, tmp_path):
    tr = Trainer(tiny_cfg("model.finetune=full", "train.epochs=1"), tmp_path)
    before = {n: p.detach().clone() for n, p in tr.acc.unwrap_model(tr.denoiser).named_parameters()}
    final = tr.run()
    after = dict(tr.acc.unwrap_model(tr.denoiser).named_parameters())
    changed = sum(not torch.equal(before[n], after[n]) for n in before)
    assert changed > 0.5 * len(before)
    assert (final / "unet" / "diffusion_pytorch_model.safetensors").is_file()


class _Interrupt(Exception):
    pass


@pytest.mark.parametrize("background", [True, False], ids=["async-checkpoint", "sync-checkpoint"])
def test_interrupted_and_resumed_equals_uninterrupted(tiny_cfg, tmp_path, request, background):
    # bit-exact on the CPU (CUDA kernels may be non-deterministic): this test runs there
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # a GPU machine may have made a CUDA one
    request.addfinalizer(lambda: AcceleratorState._reset_state(reset_partial_state=True))

    cfg = tiny_cfg("train.epochs=3", f"train.async_checkpoint={str(background).lower()}")
    cpu = Accelerator(cpu=True)
    straight = Trainer(cfg, tmp_path / "a", accelerator=cpu)
    straight.run()
    steps_per_epoch = straight.plan.optimizer_steps_per_epoch

    def crash_in_epoch_2(trainer):
        if trainer.global_step == 2 * steps_per_epoch + 1:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        Trainer(cfg, tmp_path / "b", accelerator=cpu, callbacks=[OnStep(crash_in_epoch_2)]).run()
    # a half-written checkpoint from a crash is ignored
    (tmp_path / "b" / "checkpoints" / "epoch_0002.tmp").mkdir()
    assert [d.name for d in checkpoint_dirs(tmp_path / "b")] == ["epoch_0000", "epoch_0001"]
    resumed = Trainer(cfg, tmp_path / "b", accelerator=cpu)
    resumed.run(resume=True)
    a, b = straight.trainable_state(), resumed.trainable_state()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed run differs from the uninterrupted one"


def test_checkpoint_snapshot_is_a_copy_in_peft_naming(tiny_cfg, tmp_path):
    from sdpo_core.families.lora import lora_state_dict
    from sdpo_core.training.checkpoint import latest_checkpoint, load_checkpoint

    tr = Trainer(tiny_cfg("train.async_checkpoint=true"), tmp_path)
    tr.run_dir.mkdir(parents=True, exist_ok=True)
    # peft's own walk of the model (views of the live weights on the CPU, hence the clone)
    reference = {k: v.clone() for k, v in lora_state_dict(tr.acc.unwrap_model(tr.denoiser)).items()}
    snap = tr.trainable_state()
    assert snap.keys() == reference.keys() and len(snap) == len(tr.trainable)
    assert all(torch.equal(snap[k], reference[k]) for k in snap)
    live = {p.data_ptr() for p in tr.trainable}
    assert not any(v.data_ptr() in live for v in snap.values()), "snapshot shares memory with the model"
    # the write runs in the background: changing the weights right after the call must not reach it
    tr.save_checkpoint(0)
    with torch.no_grad():
        for p in tr.trainable:
            p.add_(1.0)
    tr.wait_checkpoints()
    saved = load_checkpoint(latest_checkpoint(tmp_path)).weights
    assert all(torch.equal(saved[k], reference[k]) for k in reference)
    tr.close()


def test_existing_checkpoints_need_resume_flag(tiny_cfg, tmp_path):
    from sdpo_core.training.checkpoint import ResumeError

    Trainer(tiny_cfg("train.epochs=1"), tmp_path).run()
    with pytest.raises(ResumeError, match="--resume"):
        Trainer(tiny_cfg("train.epochs=1"), tmp_path).run()


def test_bf16_autocast_ratio_is_one_without_rescoring(tiny_cfg, tmp_path, request):
    # CPU bf16 autocast: trajectories are stored in float32 exactly as scored, so the first update
    # sees ratio 1 with the sampling-time log-probs (the paper's way; measured 0.065 approx KL
    # before latents were kept in float32)
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    request.addfinalizer(lambda: AcceleratorState._reset_state(reset_partial_state=True))
    tr = Trainer(tiny_cfg("model.mixed_precision=bf16", "train.recompute_log_probs=never",
                          "sample.num_steps=4"), tmp_path)
    assert tr.acc.mixed_precision == "bf16" and not tr.updater.recompute_log_probs
    samples = tr.sample_epoch(0).samples
    assert all(lat.dtype == torch.float32 for lat in samples.latents)
    metrics = tr.train_epoch(samples, 0)
    assert metrics["check/first_batch_kl"] == 0.0


@pytest.mark.parametrize("method", ["sdpo", "ddpo"])
def test_sample_grid_every_n_epochs(tiny_cfg, tmp_path, method):
    from PIL import Image

    from sdpo_core.tracking.trackers import NullTracker

    tracker = NullTracker()
    tr = Trainer(tiny_cfg(f"train.method={method}", "train.epochs=3", "tracking.log_images_every=2",
                          "sample.num_steps=3"), tmp_path, tracker=tracker)
    tr.run()
    grids = sorted(p.name for p in (tmp_path / "samples").iterdir())
    assert grids == ["epoch_0000.png", "epoch_0002.png"]  # epochs 0 and 2 of 0..2
    assert [a for a in tracker.artifacts if "samples" in a] == [str(tmp_path / "samples" / g) for g in grids]
    with Image.open(tmp_path / "samples" / grids[0]) as im:
        pixels = torch.tensor(list(im.convert("L").getdata()), dtype=torch.float32)
    assert pixels.std() > 10  # images and labels, not a blank canvas


@pytest.mark.parametrize("method", ["sdpo", "ddpo"])
def test_sampling_draws_x_T_then_step_noise_from_the_epoch_generator(tiny_cfg, tmp_path, method):
    # the draws the trainer always made: x_T (B, ...) shared by a pair or (2B, ...) independent,
    # then each step's noise, from one generator per (seed, epoch, process)
    from sdpo_core.training.rollout import derive_seed

    tr = Trainer(tiny_cfg(f"train.method={method}", "sample.num_steps=2", "tracking.log_images_every=5"), tmp_path)
    rollout = tr.sample_epoch(0)
    b = tr.cfg.sample.batch_size
    gen = torch.Generator().manual_seed(derive_seed(tr.cfg.seed, 0, 0, 1))
    x_T = torch.randn((b if method == "sdpo" else 2 * b, *tr.latent_shape), generator=gen)
    x_T = torch.cat([x_T, x_T]) if method == "sdpo" else x_T
    prompts = rollout.prompts[:b]
    traj = tr.policy.sample(tr.family.encode(prompts).repeat(2), x_T, gen)
    got = torch.cat(rollout.samples.latents) if method == "sdpo" else rollout.samples.latents[0]
    assert torch.equal(got, traj.latents)
