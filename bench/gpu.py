"""SDPO on full-size few-step models on one GPU: the trainer's own epoch, timed, with memory and MFU.

Cases (``--case``, or ``all``): SD-Turbo, SDXL-Turbo, SD3.5-Large-Turbo and FLUX.1-schnell shaped
pipelines with random weights, built from the released configs in ``bench/gpu_models.py`` (no
download) and written with ``save_pretrained`` to a work directory. For each, a ``Trainer`` is
built from a config (the ``tiny-random`` pipeline with ``model.pretrained=DIR``, bf16 mixed
precision, gradient checkpointing, LoRA rank ``--lora-rank``, the case's steps / resolution /
batch sizes, ``tracking.backend=none``), so the family is read from the directory's
``model_index.json`` and the sampler from its scheduler config exactly as in a real run. Then:

  * one unmeasured warm-up epoch (``Trainer.sample_epoch`` + ``Trainer.train_epoch``), then
    ``--epochs`` measured ones, each part between ``torch.cuda.synchronize`` calls;
  * peak GPU memory (``torch.cuda.max_memory_allocated``) of loading, sampling and training;
  * MFU: FLOPs of one denoiser forward counted by ``FlopCounterMode`` on the trainer's own
    ``denoise_fn`` (at the sampling batch of 2B items), times the forwards an epoch makes:
    sampling T x 2B; training 3 forward-equivalents (forward + backward) per trained item, plus
    one no-grad forward per item when the trainer recomputes old log-probs (train.recompute_log_probs).
    Recomputation under gradient checkpointing is not counted (model FLOPs, not hardware FLOPs).
    Against ``--peak-tflops`` (default 989: dense bf16 of an H100 SXM / H200; H100 PCIe: 756).

The reward is ``jpeg_compressibility`` (no weights), so the reward time is the VAE decodes of the
queried x0 plus a JPEG encode per image, and the measurement is the trainer, the denoiser and
the VAE.

Run (GPU)::

    bash bench/gpu_run.sh                      # every case, each in its own process, into $OUT
    python3 bench/gpu.py --case flux-schnell --out /tmp/flux.json
    python bench/gpu.py --smoke --out /tmp/gpu_smoke.json   # CPU: the tiny pipeline of each family
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # sdpo_core and bench/ from this checkout

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from bench.gpu_models import CASES, Case, build_pipeline  # noqa: E402

PROMPTS = ["a photo of a cat", "a dog", "a picture of a horse", "a cow on grass", "a pig in a field", "a bird",
           "a fish", "a rabbit"]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "no": torch.float32}


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def reset_peak() -> None:
    if torch.cuda.is_available():
        sync()
        torch.cuda.reset_peak_memory_stats()


def peak_gb() -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def free_gpu() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def make_trainer(model_dir: Path, case: Case, args, run_dir: Path):
    from sdpo_core.config import load_config
    from sdpo_core.training.trainer import Trainer

    resolution = case.smoke_resolution if args.smoke else args.resolution or case.resolution
    overrides = [
        f"model.pretrained={model_dir}", "model.build=null", f"model.mixed_precision={args.mixed_precision}",
        f"model.gradient_checkpointing={str(args.gradient_checkpointing).lower()}", f"model.lora_rank={args.lora_rank}",
        f"sample.num_steps={args.steps or case.steps}", f"sample.batch_size={args.sample_batch}",
        f"sample.num_batches_per_epoch={args.sample_batches}", f"train.batch_size={args.train_batch}",
        "train.epochs=1000", "train.keep_checkpoints=1", "tracking.backend=none", "tracking.log_images_every=1000",
        "reward.name=jpeg_compressibility",
    ]
    if resolution is not None:
        overrides.append(f"sample.resolution={resolution}")
    cfg = load_config("tiny-random", overrides, ROOT / "pipelines.yaml")
    return Trainer(cfg, run_dir, train_prompts=PROMPTS)


def forward_flops(tr) -> float:
    """FLOPs of one denoiser forward per item: the trainer's ``denoise_fn`` at the sampling batch
    (2B items: both trajectories of B prompts) and the first timestep, counted by FlopCounterMode."""
    b = tr.cfg.sample.batch_size
    cond = tr.family.encode([PROMPTS[i % len(PROMPTS)] for i in range(b)]).repeat(2).to(tr.acc.device)
    x = torch.randn((2 * b, *tr.latent_shape), device=tr.acc.device)
    model = tr.acc.unwrap_model(tr.denoiser)
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        tr.denoise_fn(model)(x, tr.timesteps[0], cond)
    return counter.get_total_flops() / (2 * b)


def epoch(tr, e: int) -> dict:
    """One epoch of the trainer's own sampling and training, each part timed between syncs."""
    reset_peak()
    start = time.perf_counter()
    rollout = tr.sample_epoch(e)
    samples, stats = rollout.samples, rollout.stats
    sync()
    sampled = time.perf_counter()
    mem_sample = peak_gb()
    reset_peak()
    t0 = time.perf_counter()
    metrics = tr.train_epoch(samples, e)
    sync()
    end = time.perf_counter()
    items = len(samples.cond) * len(samples.latents)  # trajectories trained per step position
    n_steps = max(1, math.ceil(tr.cfg.sample.num_steps * tr.cfg.train.timestep_fraction))
    return {
        "sample_epoch_s": sampled - start, "sampling_s": stats["time/sampling"], "reward_s": stats["time/reward"],
        "reward_wait_s": stats["time/reward_wait"], "train_epoch_s": end - t0,
        "trajectories": items, "train_steps": n_steps * math.ceil(len(samples.cond) / tr.cfg.train.batch_size),
        "trained_items": n_steps * items, "sample_peak_gb": mem_sample, "train_peak_gb": peak_gb(),
        "first_batch_kl": metrics["check/first_batch_kl"], "loss": metrics["loss"],
    }


def run_case(name: str, args, work: Path, peak: float) -> dict:
    case = CASES[name]
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    t0 = time.perf_counter()
    pipe = build_pipeline(case, args.smoke, device, DTYPES[args.mixed_precision])
    model_dir = work / name
    pipe.save_pretrained(model_dir, safe_serialization=True)
    del pipe
    free_gpu()
    built = time.perf_counter()
    reset_peak()
    tr = make_trainer(model_dir, case, args, work / f"{name}-run")
    loaded = time.perf_counter()
    row = {"case": name, "family": type(tr.family).__name__, "sampler": type(tr.sampler).__name__,
           "resolution": tr.cfg.sample.resolution, "latent_shape": list(tr.latent_shape),
           "steps": tr.cfg.sample.num_steps, "sample_batch": tr.cfg.sample.batch_size,
           "train_batch": tr.cfg.train.batch_size, "recompute_log_probs": tr.updater.recompute_log_probs,
           "denoiser_params": sum(p.numel() for p in tr.acc.unwrap_model(tr.denoiser).parameters()),
           "lora_params": sum(p.numel() for p in tr.trainable), "build_save_s": built - t0,
           "load_s": loaded - built, "load_peak_gb": peak_gb()}
    try:
        flops = forward_flops(tr)
        epoch(tr, 0)  # warm-up: allocator, kernels, autotuning, the reward thread
        runs = [epoch(tr, e) for e in range(1, args.epochs + 1)]
    finally:
        tr.close()
        tr.acc.free_memory()
        del tr
        free_gpu()
        shutil.rmtree(model_dir, ignore_errors=True)
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0] if isinstance(runs[0][k], int | float)}
    sample_flops = row["steps"] * runs[0]["trajectories"] * flops
    train_fwd = 3 + (1 if row["recompute_log_probs"] else 0)
    train_flops = train_fwd * runs[0]["trained_items"] * flops
    row.update({
        "forward_flops_per_item": flops, "epochs": runs,
        "sampling_trajectories_per_s": runs[0]["trajectories"] / med["sampling_s"],
        "train_step_s": med["train_epoch_s"] / runs[0]["train_steps"],
        "sampling_mfu": sample_flops / med["sampling_s"] / (peak * 1e12),
        "train_flops_per_epoch": train_flops, "train_mfu": train_flops / med["train_epoch_s"] / (peak * 1e12),
        "median": med,
    })
    return row


def markdown(result: dict) -> str:
    def gb(v):
        return "-" if v is None else f"{v:.1f}"

    lines = [
        f"device: {result['device']}, peak {result['peak_tflops']} TFLOP/s; {result['mixed_precision']}, "
        f"gradient checkpointing {result['gradient_checkpointing']}, LoRA rank {result['lora_rank']}", "",
        "| case | family / sampler | denoiser params | px | T | B | sample epoch s | traj/s | sampling MFU | "
        "train epoch s | train step s | train MFU | load / sample / train peak GB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, r in result["cases"].items():
        if "error" in r:
            lines.append(f"| {name} | error: {r['error'][:120]} |")
            continue
        m = r["median"]
        lines.append(
            f"| {name} | {r['family']} / {r['sampler']} | {r['denoiser_params'] / 1e6:.1f}M | {r['resolution']} | "
            f"{r['steps']} | {r['sample_batch']} | {m['sample_epoch_s']:.2f} | {r['sampling_trajectories_per_s']:.2f} | "
            f"{100 * r['sampling_mfu']:.1f}% | {m['train_epoch_s']:.2f} | {r['train_step_s']:.3f} | "
            f"{100 * r['train_mfu']:.1f}% | {gb(r['load_peak_gb'])} / {gb(m.get('sample_peak_gb'))} / "
            f"{gb(m.get('train_peak_gb'))} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", choices=[*CASES, "all"], default="all")
    ap.add_argument("--resolution", type=int, default=None, help="px (default: the model card's, per case)")
    ap.add_argument("--steps", type=int, default=None, help="denoising steps T (default: per case, 4)")
    ap.add_argument("--sample-batch", type=int, default=2, help="prompts per sampling batch (2x trajectories)")
    ap.add_argument("--sample-batches", type=int, default=1, help="sampling batches per epoch")
    ap.add_argument("--train-batch", type=int, default=1, help="pairs per backward (train.batch_size)")
    ap.add_argument("--epochs", type=int, default=1, help="measured epochs (after one warm-up epoch)")
    ap.add_argument("--lora-rank", type=int, default=4)
    ap.add_argument("--mixed-precision", choices=["bf16", "fp16", "no"], default="bf16")
    ap.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false")
    ap.add_argument("--peak-tflops", type=float, default=989.0,
                    help="peak dense TFLOP/s of the device in the compute dtype (H100 SXM / H200 bf16: 989)")
    ap.add_argument("--work-dir", default=None, help="where the random pipelines are written (default: a temp dir)")
    ap.add_argument("--out", default="bench/results/gpu.json")
    ap.add_argument("--smoke", action="store_true", help="CPU, the tiny pipeline of each family, float32 (CI)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.mixed_precision, args.sample_batch, args.train_batch, args.steps = "no", 2, 1, 2
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    names = list(CASES) if args.case == "all" else [args.case]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() and not args.smoke else (
        f"CPU ({platform.processor() or 'cpu'}, {torch.get_num_threads()} threads)")
    cases = {}
    with tempfile.TemporaryDirectory(prefix="sdpo-gpu-", dir=args.work_dir) as tmp:
        for name in names:
            try:
                cases[name] = run_case(name, args, Path(tmp), args.peak_tflops)
            except Exception as exc:  # one case out of memory must not lose the others' results
                if args.smoke:
                    raise
                cases[name] = {"case": name, "error": f"{type(exc).__name__}: {exc}"}
                free_gpu()
            print(f"{name}: done at {time.perf_counter() - start:.0f}s", flush=True)
    import diffusers
    import transformers

    result = {
        "benchmark": "gpu", "smoke": args.smoke, "device": device, "peak_tflops": args.peak_tflops,
        "mixed_precision": args.mixed_precision, "gradient_checkpointing": args.gradient_checkpointing,
        "lora_rank": args.lora_rank, "torch": torch.__version__, "diffusers": diffusers.__version__,
        "transformers": transformers.__version__, "python": platform.python_version(), "args": vars(args),
        "cases": cases, "wall_s": time.perf_counter() - start,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result))
    print(f"wrote {out} ({result['wall_s']:.0f}s)")
    return 1 if any("error" in c for c in cases.values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
