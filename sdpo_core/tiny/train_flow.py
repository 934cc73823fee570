"""Build the flow default ``digits-flow-tiny``: a real diffusers ``StableDiffusion3Pipeline`` (SD3
layout, no T5) trained here, on CPU, by flow matching on scikit-learn's digits.

Run::

    python -m sdpo_core.tiny.train_flow runs/digits-flow-tiny/base [--steps 3000]

Same data, VAE recipe and judge as digits-tiny (:mod:`sdpo_core.tiny.train_base`):

1. AutoencoderKL (4 latent channels, 8x8): reconstruct the diffusion split; then set the SD3-style
   ``shift_factor`` (latent mean) and ``scaling_factor`` (1 / std), so latents are
   ``(z - shift) * scale`` with zero mean and unit variance.
2. Transformer + both CLIP encoders jointly, rectified flow (Liu et al. 2022; SD3, Esser et al.
   2024): ``x_t = (1 - t) x0 + t eps``, target ``v = eps - x0``, t uniform in [0, 1] (few-step
   sampling starts at t = 1, which logit-normal t rarely visits), 10% empty prompts.
3. Evaluate with the deterministic flow sampler (``FlowSDESampler``, noise 0) at 1/2/4/8 steps.
4. Save atomically (``model_index.json`` last) with ``classifier/`` and ``build_info.json``.

The model conditions on CLIP tokens only: use it with ``max_sequence_length`` 0 (no T5 tokens).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from sdpo_core.evaluation import metrics
from sdpo_core.families.sd3 import SD3Family
from sdpo_core.rewards import build_reward, digits
from sdpo_core.samplers.flow_sde import FlowSDESampler
from sdpo_core.tiny.classifier import classifier_accuracy, load_or_train_classifier
from sdpo_core.tiny.flow import build_tiny_sd3
from sdpo_core.tiny.train_base import (
    EMPTY_PROMPT_FRACTION,
    EVAL_STEPS,
    _latent_stats,
    _prompt_table,
    _save_atomic,
    _train_vae,
    eval_prompts,
)

T5_TOKENS = 0  # the SD3 pipeline's max_sequence_length for this model: CLIP tokens only


def _set_shift_and_scale(vae, mean: torch.Tensor, std: torch.Tensor) -> tuple[float, float]:
    """SD3's latent normalisation from posterior means / stds (N, C, h, w): shift = E[z],
    scale = 1 / std(z) over posterior samples."""
    shift = mean.mean().item()
    scale = 1.0 / (mean.var() + std.pow(2).mean()).sqrt().item()
    vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    return shift, scale


def _conditioning(pipe, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (B, L) -> (hidden (B, L, 2D), pooled (B, 2D)) with gradients, as
    ``StableDiffusion3Pipeline.encode_prompt`` builds them (penultimate CLIP layers, no T5)."""
    hidden, pooled = [], []
    for enc in (pipe.text_encoder, pipe.text_encoder_2):
        out = enc(ids, output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        pooled.append(out[0])
    return torch.cat(hidden, dim=-1), torch.cat(pooled, dim=-1)


def _train_flow(pipe, latents, labels, steps, gen, batch_size, lr, progress) -> float:
    """Transformer + text encoders by rectified flow; returns the mean loss of the last 100 steps."""
    modules = (pipe.transformer, pipe.text_encoder, pipe.text_encoder_2)
    params = [p for m in modules for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / 100) * (1 - i / steps) + 0.05)
    table, empty = _prompt_table(pipe.tokenizer)
    mean, std = latents
    vae = pipe.vae.config
    for m in modules:
        m.train()
    losses = []
    for _ in tqdm(range(steps), desc="flow", disable=not progress):
        idx = torch.randint(0, len(labels), (batch_size,), generator=gen)
        z = mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)
        x0 = (z - vae.shift_factor) * vae.scaling_factor
        ids = table[labels[idx], torch.randint(0, table.shape[1], (batch_size,), generator=gen)]
        drop = torch.rand(batch_size, generator=gen) < EMPTY_PROMPT_FRACTION
        ids = torch.where(drop[:, None], empty[None], ids)
        eps = torch.randn(x0.shape, generator=gen)
        t = torch.rand(batch_size, generator=gen)
        tb = t[:, None, None, None]
        hidden, pooled = _conditioning(pipe, ids)
        v = pipe.transformer(hidden_states=(1 - tb) * x0 + tb * eps, timestep=t * 1000,
                             encoder_hidden_states=hidden, pooled_projections=pooled, return_dict=False)[0]
        loss = F.mse_loss(v, eps - x0)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
    for m in modules:
        m.eval().requires_grad_(False)
    return float(np.mean(losses[-100:]))


@torch.no_grad()
def sample_flow(family: SD3Family, prompts: list[str], num_steps: int, seed: int,
                sigma_schedule: str = "scheduler", batch_size: int = 100) -> torch.Tensor:
    """Deterministic flow sampling (FlowSDESampler, noise 0): N prompts -> (N, 3, 32, 32) in [0, 1]."""
    shape = family.latent_shape(None)
    options = {**family.sampler_options(shape), "sigma_schedule": sigma_schedule}
    sampler = FlowSDESampler(family.scheduler_config, num_steps, noise_level=0.0, **options)
    gen = torch.Generator().manual_seed(seed)
    images = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i : i + batch_size]
        cond = family.encode(chunk)
        x = torch.randn(len(chunk), *shape, generator=gen)
        for k, t in enumerate(sampler.timesteps):
            x = sampler.step(family.denoise(family.denoiser, x, t, cond), torch.tensor([k]), x).prev_sample
        images.append(family.decode(x))
    return torch.cat(images)


def evaluate_flow_digits(family: SD3Family, classifier_path, steps=EVAL_STEPS, per_digit: int = 20,
                         seed: int = 0, sigma_schedule: str = "scheduler") -> dict:
    """Digit accuracy and mean rewards at each step count: ``{steps: {metric: value}}``."""
    prompts, labels = eval_prompts(per_digit)
    opts = {"classifier_path": str(classifier_path)}
    rewards = {name: build_reward(name, opts) for name in ("digit_alignment", "digit_alignment_bold")}
    model = digits.get_classifier(classifier_path)
    table = {}
    for n in steps:
        images = sample_flow(family, prompts, n, seed, sigma_schedule)
        row = {name: fn(images, prompts).mean().item() for name, fn in rewards.items()}
        row["accuracy"] = classifier_accuracy(model, images, labels)
        row["diversity"] = metrics.diversity(images, prompts, labels)
        table[n] = row
    return table


def digits_flow_pipeline(seed: int):
    """The digits-flow-tiny architecture (a tiny SD3), randomly initialised."""
    return build_tiny_sd3(seed=seed, words=digits.digit_vocabulary(), latent_channels=4, patch_size=1,
                          num_layers=4, attention_head_dim=16, num_attention_heads=4, shift=1.0)


def build_digits_flow_tiny(out_dir: str | Path, seed: int = 0, steps: int = 3000, vae_steps: int = 300,
                           batch_size: int = 32, lr: float = 1e-3, progress: bool = True, force: bool = False,
                           eval_per_digit: int = 20) -> Path:
    """Train digits-flow-tiny into ``out_dir`` (reused as is if it holds a build, unless ``force``)."""
    out = Path(out_dir)
    if (out / "model_index.json").is_file() and not force:
        return out
    start = time.time()
    (out / "model_index.json").unlink(missing_ok=True)
    classifier_dir = out / "classifier"
    _, cls_info = load_or_train_classifier(classifier_dir)
    images, labels = digits.load_digit_images("diffusion")
    gen = torch.Generator().manual_seed(seed)
    pipe = digits_flow_pipeline(seed)
    psnr = _train_vae(pipe.vae, images, vae_steps, gen, batch_size, progress)
    mean, std = _latent_stats(pipe.vae, images)
    shift, scale = _set_shift_and_scale(pipe.vae, mean, std)
    loss = _train_flow(pipe, (mean, std), labels, steps, gen, batch_size, lr, progress)
    train_seconds = time.time() - start
    pipe.set_progress_bar_config(disable=True)
    family = SD3Family(pipe, max_sequence_length=T5_TOKENS)
    by_schedule = {s: evaluate_flow_digits(family, classifier_dir, per_digit=eval_per_digit, seed=seed,
                                           sigma_schedule=s) for s in ("scheduler", "uniform")}
    info = {
        "model": "digits-flow-tiny", "transformer_steps": steps, "vae_steps": vae_steps, "seed": seed,
        "batch_size": batch_size, "lr": lr, "train_seconds": round(train_seconds, 1),
        "seconds": round(time.time() - start, 1), "vae_psnr_db": round(psnr, 2),
        "shift_factor": shift, "scaling_factor": scale, "final_loss": loss, "max_sequence_length": T5_TOKENS,
        "classifier": {k: cls_info[k] for k in ("test_accuracy", "diffusion_split_accuracy") if k in cls_info},
        "eval": {"samples": 10 * eval_per_digit, "noise_level": 0.0, "by_schedule": by_schedule},
    }
    _save_atomic(pipe, out, info)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", nargs="?", default="runs/digits-flow-tiny/base")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--vae-steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args(argv)
    out = build_digits_flow_tiny(args.out_dir, seed=args.seed, steps=args.steps, vae_steps=args.vae_steps,
                                 force=args.force)
    print(json.dumps(json.loads((out / "build_info.json").read_text()), indent=2))


if __name__ == "__main__":
    main()
