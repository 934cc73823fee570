"""Build the embedded default model ``digits-tiny``: a real diffusers ``StableDiffusionPipeline``
trained here, on CPU, from scikit-learn's handwritten digits (see :mod:`sdpo_core.rewards.digits`).

Run::

    python -m sdpo_core.tiny.train_base runs/digits-tiny/base [--grid /tmp/digits_grid.png]

Budgets are optimizer steps, not seconds, and the build runs with a fixed number of threads
(:mod:`sdpo_core.tiny.repro`), so a build gives the same model on any machine with the same
instruction set (``build_info.json`` records torch, threads and CPU):

1. AutoencoderKL: reconstruct the diffusion split (MSE + a tiny KL); then scale latents to unit
   std through ``vae.config.scaling_factor`` (as SD does with its 0.18215).
2. UNet + CLIP text encoder jointly: DDPM epsilon loss at uniform timesteps in [0, 1000), a
   random phrasing per image, 10% empty prompts (so classifier-free guidance stays possible).
3. Evaluate: sample 1/2/4/8 DDIM steps (trailing spacing, eta 1, guidance 1), score with the
   classifier trained on the held-out split.
4. Save: pipeline (safetensors) + ``classifier/`` + ``build_info.json`` via a temp dir;
   ``model_index.json`` is moved in last, so its presence means a complete build.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import StableDiffusionPipeline
from PIL import Image
from tqdm.auto import tqdm

from sdpo_core.evaluation import metrics
from sdpo_core.families.loading import load_family
from sdpo_core.rewards import build_reward, digits
from sdpo_core.tiny.classifier import classifier_accuracy, load_or_train_classifier
from sdpo_core.tiny.random_model import TinySizes, build_tiny_pipeline
from sdpo_core.tiny.repro import build_environment, fixed_threads

EMPTY_PROMPT_FRACTION = 0.1
EVAL_STEPS = (1, 2, 4, 8)


def _train_vae(
    vae, images: torch.Tensor, steps: int, gen: torch.Generator, batch_size: int, progress: bool
) -> float:
    """Fit the AutoencoderKL to images (N, 3, 32, 32) in [0, 1]; returns the final PSNR in dB."""
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    vae.train()
    for _ in tqdm(range(steps), desc="vae", disable=not progress):
        x = images[torch.randint(0, len(images), (batch_size,), generator=gen)] * 2 - 1
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        # a tiny KL keeps latents bounded without blurring (SD's VAE uses 1e-6 too)
        loss = F.mse_loss(vae.decode(z).sample, x) + 1e-6 * post.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        x = images[:256] * 2 - 1
        mse = F.mse_loss(vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1), x).item()
    return 10 * np.log10(4.0 / mse)  # the peak-to-peak range of [-1, 1] is 2


@torch.no_grad()
def _latent_stats(vae, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every image: (N, 3, 32, 32) -> two (N, 4, 8, 8), unscaled;
    sets ``vae.config.scaling_factor`` to 1 / std of posterior samples (unit-variance latents)."""
    post = [vae.encode(x * 2 - 1).latent_dist for x in images.split(256)]
    mean, std = torch.cat([p.mean for p in post]), torch.cat([p.std for p in post])
    sample_std = (mean.var() + std.pow(2).mean()).sqrt().item()
    vae.register_to_config(scaling_factor=1.0 / sample_std)
    return mean, std


def _prompt_table(tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids of every phrasing (10, P, L) and of the empty prompt (L,)."""

    def ids(texts: list[str]) -> torch.Tensor:
        return tokenizer(
            texts,
            padding="max_length",
            truncation=True,
            max_length=tokenizer.model_max_length,
            return_tensors="pt",
        ).input_ids

    table = torch.stack([ids(digits.digit_prompts(d)) for d in range(10)])
    return table, ids([""])[0]


def _train_denoiser(
    pipe: StableDiffusionPipeline,
    latents: tuple[torch.Tensor, torch.Tensor],
    labels: torch.Tensor,
    steps: int,
    gen: torch.Generator,
    batch_size: int,
    lr: float,
    progress: bool,
) -> float:
    """UNet + text encoder, epsilon objective (DDPM, Ho et al. 2020 eq. 14); returns the mean
    loss of the last 100 steps."""
    unet, text_encoder, sched = pipe.unet, pipe.text_encoder, pipe.scheduler
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    table, empty = _prompt_table(pipe.tokenizer)
    mean, std = latents
    scale = pipe.vae.config.scaling_factor
    unet.train()
    text_encoder.train()
    losses = []
    for _ in tqdm(range(steps), desc="unet", disable=not progress):
        # 1. a batch of latents sampled from each image's posterior, one random phrasing each
        idx = torch.randint(0, len(labels), (batch_size,), generator=gen)
        z0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)) * scale
        ids = table[labels[idx], torch.randint(0, table.shape[1], (batch_size,), generator=gen)]
        drop = torch.rand(batch_size, generator=gen) < EMPTY_PROMPT_FRACTION
        ids = torch.where(drop[:, None], empty[None], ids)
        # 2. noise at a uniform timestep, predict the noise
        noise = torch.randn(z0.shape, generator=gen)
        t = torch.randint(0, sched.config.num_train_timesteps, (batch_size,), generator=gen)
        pred = unet(sched.add_noise(z0, noise, t), t, text_encoder(ids)[0]).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
    unet.eval().requires_grad_(False)
    text_encoder.eval().requires_grad_(False)
    return float(np.mean(losses[-100:]))


def eval_prompts(per_digit: int) -> tuple[list[str], torch.Tensor]:
    """``per_digit`` prompts for each digit, cycling through its phrasings; and their digits (N,)."""
    prompts = [
        digits.digit_prompts(d)[i % len(digits.TEMPLATES)] for d in range(10) for i in range(per_digit)
    ]
    return prompts, torch.arange(10).repeat_interleave(per_digit)


@torch.no_grad()
def sample(
    pipe: StableDiffusionPipeline, prompts: list[str], num_steps: int, seed: int, batch_size: int = 50
) -> torch.Tensor:
    """Sample with the pipeline's own call (eta 1, guidance 1): N prompts -> (N, 3, 32, 32) in [0, 1]."""
    gen = torch.Generator().manual_seed(seed)
    out = [
        pipe(
            prompts[i : i + batch_size],
            num_inference_steps=num_steps,
            eta=1.0,
            guidance_scale=1.0,
            output_type="pt",
            generator=gen,
        ).images
        for i in range(0, len(prompts), batch_size)
    ]
    return torch.cat(out).float()


def evaluate_digits(
    pipe: StableDiffusionPipeline,
    classifier_path: str | Path,
    steps: tuple[int, ...] = EVAL_STEPS,
    per_digit: int = 20,
    seed: int = 0,
) -> dict:
    """Mean rewards, digit accuracy, same-digit diversity and boldness of 10 x ``per_digit``
    samples at each step count, and of the real held-out digits: ``{steps | "real": {metric: value}}``."""
    pipe.set_progress_bar_config(disable=True)
    prompts, labels = eval_prompts(per_digit)
    opts = {"classifier_path": str(classifier_path)}
    rewards = {name: build_reward(name, opts) for name in ("digit_alignment", "digit_alignment_bold")}
    model = digits.get_classifier(classifier_path)

    def row(images: torch.Tensor, prompts: list[str], labels: torch.Tensor) -> dict:
        out = {name: fn(images, prompts).mean().item() for name, fn in rewards.items()}
        out["accuracy"] = classifier_accuracy(model, images, labels)
        out["diversity"] = metrics.diversity(images, prompts, labels)
        out["boldness"] = metrics.boldness(images)
        return out

    table = {n: row(sample(pipe, prompts, n, seed), prompts, labels) for n in steps}
    real, real_labels = digits.load_digit_images("heldout")  # the reference: real digits the model never saw
    table["real"] = row(real, [f"a handwritten digit {d}" for d in real_labels.tolist()], real_labels)
    return table


def _save_atomic(pipe: StableDiffusionPipeline, out: Path, info: dict) -> None:
    """Save into a temp dir beside ``out``, then move entries in; ``model_index.json`` last."""
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        (tmp / "build_info.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
        entries = sorted(tmp.iterdir(), key=lambda p: p.name == "model_index.json")
        for entry in entries:
            target = out / entry.name
            if target.is_dir():
                shutil.rmtree(target)
            os.replace(entry, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def build_digits_base(
    out_dir: str | Path,
    steps: int = 2000,
    vae_steps: int = 300,
    seed: int = 0,
    batch_size: int = 32,
    lr: float = 2e-3,
    progress: bool = True,
    force: bool = False,
    eval_per_digit: int = 20,
) -> Path:
    """Train digits-tiny into ``out_dir`` (reused as is if it already holds a build, unless ``force``)."""
    out = Path(out_dir)
    if (out / "model_index.json").is_file() and not force:
        return out
    with fixed_threads():  # the same weights whatever this machine's core count (repro.py)
        _build(out, steps, vae_steps, seed, batch_size, lr, progress, eval_per_digit)
    return out


def digits_pipeline(seed: int) -> StableDiffusionPipeline:
    """The digits-tiny architecture, randomly initialised (what ``sdpo base`` then trains)."""
    return build_tiny_pipeline(TinySizes(words=digits.digit_vocabulary(), prediction_type="epsilon"), seed=seed)


def _build(
    out: Path,
    steps: int,
    vae_steps: int,
    seed: int,
    batch_size: int,
    lr: float,
    progress: bool,
    eval_per_digit: int,
) -> None:
    start = time.time()
    (out / "model_index.json").unlink(missing_ok=True)  # a forced rebuild is incomplete until saved
    classifier_dir = out / "classifier"
    # the judge does not depend on the base model's seed: it always trains with its own fixed seed
    _, cls_info = load_or_train_classifier(classifier_dir)
    images, labels = digits.load_digit_images("diffusion")
    gen = torch.Generator().manual_seed(seed)
    pipe = digits_pipeline(seed)
    psnr = _train_vae(pipe.vae, images, vae_steps, gen, batch_size, progress)
    latents = _latent_stats(pipe.vae, images)
    loss = _train_denoiser(pipe, latents, labels, steps, gen, batch_size, lr, progress)
    train_seconds = time.time() - start
    table = evaluate_digits(pipe, classifier_dir, per_digit=eval_per_digit, seed=seed)
    info = {
        "model": "digits-tiny",
        "unet_steps": steps,
        "vae_steps": vae_steps,
        "seed": seed,
        "batch_size": batch_size,
        "lr": lr,
        "train_seconds": round(train_seconds, 1),
        "seconds": round(time.time() - start, 1),
        "vae_psnr_db": round(psnr, 2),
        "scaling_factor": pipe.vae.config.scaling_factor,
        "final_loss": loss,
        "classifier": {
            k: cls_info[k] for k in ("test_accuracy", "diffusion_split_accuracy") if k in cls_info
        },
        "environment": build_environment(),
        "eval": {"samples": 10 * eval_per_digit, "eta": 1.0, "guidance_scale": 1.0, "by_steps": table},
    }
    _save_atomic(pipe, out, info)


def save_grid(
    pipe: StableDiffusionPipeline,
    path: str | Path,
    steps: tuple[int, ...] = EVAL_STEPS,
    seed: int = 0,
    zoom: int = 3,
) -> Path:
    """A PNG with one row per step count and one column per digit 0-9 ("a handwritten digit d")."""
    prompts = [f"a handwritten digit {d}" for d in range(10)]
    rows = [sample(pipe, prompts, n, seed) for n in steps]  # each (10, 3, 32, 32)
    grid = torch.cat([torch.cat(list(r), dim=2) for r in rows], dim=1)  # (3, 32 rows, 32 x 10)
    array = (grid.permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype(np.uint8)
    image = Image.fromarray(array).resize((array.shape[1] * zoom, array.shape[0] * zoom), Image.NEAREST)
    image.save(path)
    return Path(path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", nargs="?", default="runs/digits-tiny/base")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--vae-steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true")
    parser.add_argument("--grid", help="also save an image grid (rows 1/2/4/8 steps, columns 0-9) here")
    args = parser.parse_args(argv)
    out = build_digits_base(
        args.out_dir, steps=args.steps, vae_steps=args.vae_steps, seed=args.seed, force=args.force
    )
    print(json.dumps(json.loads((out / "build_info.json").read_text()), indent=2))
    if args.grid:
        print("grid:", save_grid(load_family(str(out)).pipe, args.grid))


if __name__ == "__main__":
    main()
