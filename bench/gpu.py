"""SDPO on an SD-Turbo-shaped model on one GPU: throughput, memory and model FLOPs utilisation.

The pipeline is built here from the public SD-Turbo / SD 2.1 configs (below), with random
weights (no download): UNet2DConditionModel of SD 2.1 (866M parameters), the SD AutoencoderKL,
an OpenCLIP-ViT-H-shaped CLIPTextModel (23 layers, hidden 1024) with a small word-level
tokenizer, a DDIM scheduler with trailing spacing. LoRA rank 4 on the UNet's attention
projections (``sdpo_core.models.add_lora``), bf16 autocast, 512x512 images (64x64 latents).

Measured with OUR code, at 1, 4 and 50 denoising steps:
  * sampling: ``sdpo_core.sampling.sample_pairs`` (paired trajectories, stochastic DDIM with
    log-probs) -> trajectories per second, peak GPU memory, MFU;
  * reward queries: VAE decode of the x0 SDPO scores (first, anchor, last step; each distinct
    step once, so 1 / 2 / 3 per trajectory at T = 1 / 2 / >= 3) -> images/s;
  * training: one SDPO optimizer step on b pairs exactly as ``Trainer._batch_loss`` builds it
    (UNet forward of 2b items, ``ddim_step`` log-probs, ``sdpo_loss``, backward, clip, AdamW)
    -> steps per second, peak GPU memory, MFU.
FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode`` on one UNet forward (sampling)
and on one whole training step (forward + backward); MFU = counted FLOPs / time / peak, with the
peak bf16 dense TFLOP/s looked up by device name (``--peak-tflops`` overrides).

Run (GPU, under 6 minutes on an H100)::

    python3 bench/gpu.py --out bench/results/gpu.json
    bash bench/gpu_run.sh                 # the same, after installing wheels from .whl/ if present
    python bench/gpu.py --smoke --out /tmp/gpu_smoke.json     # CPU, tiny shrunken config, seconds

Also profiles one sampling call and one training step at T=4 (``<out stem>_profile.txt``: op
tables, GPU-busy share, kernel launches, host syncs; ``--no-profile`` skips it), and measures the
host-side dispatch cost of one UNet call (the SD topology at tiny widths on one CPU thread:
aten ops and ms, plain / autocast / LoRA / both; ``--no-dispatch`` skips it).

Imports only torch, diffusers, transformers, peft, safetensors, numpy and light sdpo_core
modules (no pydantic, accelerate or config), so it runs on a bare GPU image.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # sdpo_core from this checkout

import torch  # noqa: E402
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel  # noqa: E402

from sdpo_core.losses import sdpo_loss, temporal_weights  # noqa: E402
from sdpo_core.models import add_lora  # noqa: E402
from sdpo_core.sampling import guided_output, sample_pairs  # noqa: E402
from sdpo_core.scheduling import DDIMParams, ddim_step  # noqa: E402
from sdpo_core.tiny.pipeline import SD_TURBO_SCHEDULER  # noqa: E402
from sdpo_core.tiny.tokenizer import build_tokenizer  # noqa: E402

# ----------------------------------------------------------------------------- configs
# stabilityai/sd-turbo unet/config.json (SD 2.1-base UNet)
SD_TURBO_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    center_input_sample=False,
    flip_sin_to_cos=True,
    freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn",
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    downsample_padding=1,
    mid_block_scale_factor=1,
    act_fn="silu",
    norm_num_groups=32,
    norm_eps=1e-5,
    cross_attention_dim=1024,
    attention_head_dim=(5, 10, 20, 20),
    use_linear_projection=True,
    upcast_attention=False,
)
# vae/config.json (the SD AutoencoderKL)
SD_TURBO_VAE = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    layers_per_block=2,
    norm_num_groups=32,
    act_fn="silu",
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    sample_size=512,
    scaling_factor=0.18215,
)
# text_encoder/config.json (OpenCLIP ViT-H/14 text tower as CLIPTextModel, penultimate layer -> 23 layers)
SD_TURBO_TEXT = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=23,
    num_attention_heads=16,
    max_position_embeddings=77,
    hidden_act="gelu",
    projection_dim=1024,
)
# --smoke: the same classes, shrunk to run on a CPU in seconds (64 px images, 8x8 latents)
SMOKE_UNET = dict(
    SD_TURBO_UNET,
    sample_size=8,
    block_out_channels=(32, 64),
    layers_per_block=1,
    norm_num_groups=8,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=(2, 4),
)
SMOKE_VAE = dict(
    SD_TURBO_VAE, block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=4, sample_size=64
)
SMOKE_TEXT = dict(
    SD_TURBO_TEXT,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    projection_dim=32,
)

PROMPT_WORDS = "a an the photo of picture cat dog horse cow pig bird fish rabbit in on grass field".split()
PROMPTS = [
    "a photo of a cat",
    "a dog",
    "a picture of a horse",
    "a cow on grass",
    "a pig in a field",
    "a bird",
    "a fish",
    "a rabbit",
]
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
# dense bf16 tensor-core peak TFLOP/s (no sparsity), matched by substring of the device name, first hit wins
PEAK_BF16_TFLOPS = [
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),
    ("H200", 989.0),
    ("GH200", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("A10G", 70.0),
    ("RTX 4090", 165.0),
]


# ----------------------------------------------------------------------------- set-up
def build(smoke: bool, device: torch.device, dtype: torch.dtype, lora_rank: int):
    """Random-weight UNet (with LoRA), VAE, text encoder, tokenizer and scheduler, on ``device``."""
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = build_tokenizer(PROMPT_WORDS, tmp, max_length=77)
    text_cfg = SMOKE_TEXT if smoke else SD_TURBO_TEXT
    with torch.device(device):  # initialise directly on the GPU: 1.2B random parameters
        unet = UNet2DConditionModel(**(SMOKE_UNET if smoke else SD_TURBO_UNET))
        vae = AutoencoderKL(**(SMOKE_VAE if smoke else SD_TURBO_VAE))
        text = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                **text_cfg,
            )
        )
    for m in (unet, vae, text):
        m.requires_grad_(False).eval().to(dtype=dtype)
    add_lora(unet, lora_rank, None, LORA_TARGETS)  # LoRA weights in float32, base frozen (as the trainer)
    return unet, vae, text, tokenizer, DDIMScheduler(**SD_TURBO_SCHEDULER)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int) -> float:
    """Median seconds of ``fn`` over ``repeats`` calls after ``warmup`` ones (synchronised)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_gb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def count_flops(fn: Callable[[], object]) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def peak_tflops(name: str, override: float | None) -> tuple[float | None, str]:
    if override:
        return override, "--peak-tflops"
    for key, value in PEAK_BF16_TFLOPS:
        if key.lower() in name.lower():
            return value, f"table ({key})"
    return None, "unknown device: pass --peak-tflops"


# ----------------------------------------------------------------------------- measurements
class Bench:
    def __init__(self, args, device: torch.device):
        self.args, self.device = args, device
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
        self.unet, self.vae, self.text, self.tok, self.sched = build(
            args.smoke, device, self.dtype, args.lora_rank
        )
        self.trainable = [p for p in self.unet.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.trainable, lr=1e-4)
        ids = self.tok(
            [PROMPTS[i % len(PROMPTS)] for i in range(args.sample_batch)],
            padding="max_length",
            truncation=True,
            max_length=77,
            return_tensors="pt",
        ).input_ids.to(device)
        with torch.no_grad():
            self.embeds = self.text(ids)[0]  # (B, 77, D)
        s = self.unet.config.sample_size
        self.latent_shape = (self.unet.config.in_channels, s, s)

    def unet_fn(self, x: torch.Tensor, t: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        # as Trainer._unet_fn: autocast, inputs cast to the inference dtype
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            return self.unet(x.to(self.dtype), t, encoder_hidden_states=e.to(self.dtype)).sample

    def schedule(self, steps: int) -> tuple[torch.Tensor, DDIMParams]:
        self.sched.set_timesteps(steps, device="cpu")
        return self.sched.timesteps.clone().long(), DDIMParams.from_scheduler(self.sched, steps, "clamp")

    def sample(self, steps: int, seed: int = 0):
        timesteps, params = self.schedule(steps)
        gen = torch.Generator(self.device).manual_seed(seed)
        noise = torch.randn((self.args.sample_batch, *self.latent_shape), generator=gen, device=self.device)
        return sample_pairs(self.unet_fn, params, timesteps, self.embeds, noise.to(self.dtype), 1.0, gen)

    def decode(self, latents: torch.Tensor) -> None:
        with torch.no_grad():
            for chunk in latents.split(self.args.decode_chunk):
                self.vae.decode(chunk.to(self.dtype) / self.vae.config.scaling_factor, return_dict=False)

    def train_step(self, traj, steps: int, pairs: int, gen: torch.Generator) -> None:
        """One SDPO optimizer step on ``pairs`` pairs at random step positions (Trainer._batch_loss)."""
        timesteps, params = self.schedule(steps)
        b = self.args.sample_batch
        rows = torch.randint(0, b, (pairs,), generator=gen)
        idx = torch.randint(0, steps, (pairs,), generator=gen)
        lat = [traj.latents[:b], traj.latents[b:]]
        lps = [traj.log_probs[:b], traj.log_probs[b:]]
        x_t = torch.cat([x[rows, idx] for x in lat])
        x_prev = torch.cat([x[rows, idx + 1] for x in lat])
        t = timesteps[idx].repeat(2).to(self.device)
        emb = self.embeds[rows].repeat(2, 1, 1)
        self.unet.train()
        out = guided_output(self.unet_fn, x_t, t, emb, 1.0, None)
        _, _, lp = ddim_step(params, out, t.cpu(), x_t, 1.0, prev_sample=x_prev)
        lp1, lp2 = lp.chunk(2)
        adv = torch.randn(2, pairs, generator=gen).to(self.device)
        w = temporal_weights(steps, 0.99, 1.0)[idx].to(self.device)
        loss, _ = sdpo_loss(lp1, lps[0][rows, idx], lp2, lps[1][rows, idx], adv[0], adv[1], w, 1e-4, 5.0)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.trainable, 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.unet.eval()

    def run_steps(self, steps: int, peak: float | None) -> dict:
        a, dev = self.args, self.device
        b = a.sample_batch
        rep = a.repeats if steps <= 8 else max(1, a.repeats // 2)
        # 1. sampling: 2B trajectories per call
        reset_peak(dev)
        t_sample = timed(lambda: self.sample(steps), dev, rep, a.warmup)
        mem_sample = peak_gb(dev)
        traj = self.sample(steps)
        x = torch.randn((2 * b, *self.latent_shape), device=dev)
        t0 = self.sched.timesteps[0]
        with torch.no_grad():
            flops_fwd = count_flops(lambda: self.unet_fn(x, t0, torch.cat([self.embeds, self.embeds])))
        row = {
            "steps": steps,
            "sample_batch_prompts": b,
            "trajectories_per_call": 2 * b,
            "sampling_s_per_call": t_sample,
            "sampling_trajectories_per_s": 2 * b / t_sample,
            "unet_forward_flops_per_item": flops_fwd / (2 * b),
            "sampling_tflops_per_s": steps * flops_fwd / t_sample / 1e12,
            "sampling_peak_mem_gb": mem_sample,
        }
        row["sampling_mfu"] = row["sampling_tflops_per_s"] / peak if peak else None
        # 2. reward queries: decode x0 at first, anchor (here: the middle step) and last step, each
        # distinct step once, as Trainer._reward_job does (T=1: one decode per trajectory, T=2: two)
        queried = traj.x0[:, sorted({0, steps // 2, steps - 1})].flatten(0, 1)
        reset_peak(dev)
        t_dec = timed(lambda: self.decode(queried), dev, max(1, rep // 2), 1)
        row.update(
            {
                "decode_images": len(queried),
                "decode_images_per_s": len(queried) / t_dec,
                "decode_s": t_dec,
                "decode_over_sampling": t_dec / t_sample,
                "decode_peak_mem_gb": peak_gb(dev),
            }
        )
        # 3. training: one optimizer step on b pairs (UNet forward of 2b + backward)
        row["train"] = []
        for pairs in a.train_batches:
            gen = torch.Generator().manual_seed(1)
            reset_peak(dev)
            t_train = timed(
                lambda p=pairs, g=gen: self.train_step(traj, steps, p, g), dev, a.train_repeats, a.warmup
            )
            mem_train = peak_gb(dev)
            flops_step = count_flops(lambda p=pairs, g=gen: self.train_step(traj, steps, p, g))
            entry = {
                "pairs": pairs,
                "unet_items": 2 * pairs,
                "s_per_step": t_train,
                "steps_per_s": 1 / t_train,
                "flops_per_step": flops_step,
                "tflops_per_s": flops_step / t_train / 1e12,
                "peak_mem_gb": mem_train,
            }
            entry["mfu"] = entry["tflops_per_s"] / peak if peak else None
            row["train"].append(entry)
        return row


def profile(bench: Bench, steps: int, pairs: int, path: Path) -> dict:
    """torch.profiler tables of one sampling call and one training step, the GPU-busy share of
    each (kernel time / wall time: well below 1 means the host, not the GPU, sets the pace) and
    the number of host-device synchronisations each makes (``torch.cuda.set_sync_debug_mode``)."""
    import warnings

    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    dev = bench.device
    cuda = dev.type == "cuda"
    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    traj = bench.sample(steps)
    gen = torch.Generator().manual_seed(2)
    jobs = {
        "sampling": lambda: bench.sample(steps),
        "training": lambda: bench.train_step(traj, steps, pairs, gen),
    }
    out, text = {}, []
    for name, fn in jobs.items():
        fn()
        sync(dev)
        with torch_profile(activities=activities) as prof:
            start = time.perf_counter()
            fn()
            sync(dev)
            wall = time.perf_counter() - start
        events = prof.key_averages()
        kernel_us = sum(getattr(e, "self_device_time_total", 0.0) for e in events)
        launches = sum(
            e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC")
        )
        syncs = None
        if cuda:
            torch.cuda.set_sync_debug_mode("warn")
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    fn()
                    sync(dev)
            finally:
                torch.cuda.set_sync_debug_mode("default")
            syncs = sum("synchroniz" in str(w.message) for w in caught)
        out[name] = {
            "wall_s": wall,
            "gpu_kernel_s": kernel_us / 1e6,
            "gpu_busy": kernel_us / 1e6 / wall,
            "kernel_launches": launches,
            "host_syncs": syncs,
        }
        text.append(
            f"# {name}: T={steps}, {pairs if name == 'training' else bench.args.sample_batch} "
            f"{'pairs' if name == 'training' else 'prompts'}; wall {wall * 1e3:.1f} ms, GPU kernels "
            f"{kernel_us / 1e3:.1f} ms ({100 * kernel_us / 1e6 / wall:.0f}% busy), {launches} kernel "
            f"launches, {syncs} host syncs\n"
        )
        if cuda:
            text.append(events.table(sort_by="self_device_time_total", row_limit=25))
        text.append(events.table(sort_by="self_cpu_time_total", row_limit=25))
    path.write_text("\n".join(text))
    return out


class _CountOps(TorchDispatchMode):
    """Counts aten operations (on a GPU: at least one kernel launch each)."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


def dispatch_overhead(repeats: int = 5) -> list[dict]:
    """Host-side cost of one SD-Turbo UNet call: the SD 2.1 topology (same blocks, layers and
    attention modules, so the same operations) with tiny widths at 8x8 latents on one CPU thread,
    where compute is negligible and the wall time is framework dispatch. Plain fp32, bf16 weights
    + autocast, + LoRA (fp32), + both (as the trainer runs it under bf16 mixed precision); aten
    ops and milliseconds per forward and per forward+backward. On a GPU this host time is a
    floor under every UNet call."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: no OpenMP hand-offs in the measurement
    cfg = dict(
        SD_TURBO_UNET,
        block_out_channels=(32, 32, 64, 64),
        attention_head_dim=(2, 2, 4, 4),
        cross_attention_dim=32,
        sample_size=8,
        norm_num_groups=8,
    )
    x, e, t = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 32), torch.tensor(999)
    rows = []
    try:
        for lora in (False, True):
            for autocast in (False, True):
                torch.manual_seed(0)
                unet = UNet2DConditionModel(**cfg).eval()
                if autocast:  # as the trainer under mixed precision: base weights in bf16, LoRA in fp32
                    unet.to(dtype=torch.bfloat16)
                if lora:
                    add_lora(unet, 4, None, LORA_TARGETS)

                def fwd(u=unet, ac=autocast):
                    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=ac):
                        return u(x, t, encoder_hidden_states=e).sample

                def fwd_bwd(f=fwd):
                    f().float().square().mean().backward()

                row = {"lora": lora, "autocast": autocast}
                for name, fn, grad in (("forward", fwd, False), ("forward_backward", fwd_bwd, True)):
                    if grad and not lora:
                        continue  # nothing trainable without LoRA
                    with torch.set_grad_enabled(grad):
                        fn()
                        counter = _CountOps()
                        with counter:
                            fn()
                        row[f"{name}_ops"] = counter.n
                        row[f"{name}_ms"] = 1e3 * timed(fn, torch.device("cpu"), repeats, 1)
                rows.append(row)
    finally:
        torch.set_num_threads(threads)
    return rows


def markdown(result: dict) -> str:
    if "rows" not in result:  # --dispatch-only
        return _dispatch_markdown(result["dispatch"])

    def pct(v):
        return "-" if v is None else f"{100 * v:.1f}%"

    def gb(v):
        return "-" if v is None else f"{v:.1f}"

    lines = [
        f"device: {result['device']} (peak {result['peak_tflops']} TFLOP/s bf16, {result['peak_source']}); "
        f"UNet {result['unet_params'] / 1e6:.0f}M params, LoRA {result['lora_params'] / 1e6:.2f}M; "
        f"{result['resolution']} px, {result['dtype']}",
        "",
        "| T | sampling traj/s | sampling MFU | sampling peak GB | decode img/s | decode / sampling time | "
        "train pairs | train steps/s | train MFU | train peak GB |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        for i, tr in enumerate(r["train"]):
            first = i == 0
            lines.append(
                f"| {r['steps'] if first else ''} | {r['sampling_trajectories_per_s']:.2f} | {pct(r['sampling_mfu'])} | "
                f"{gb(r['sampling_peak_mem_gb'])} | {r['decode_images_per_s']:.1f} | "
                f"{r.get('decode_over_sampling', float('nan')):.2f} | {tr['pairs']} | "
                f"{tr['steps_per_s']:.2f} | {pct(tr['mfu'])} | {gb(tr['peak_mem_gb'])} |"
                if first
                else f"| | | | | | | {tr['pairs']} | {tr['steps_per_s']:.2f} | {pct(tr['mfu'])} | {gb(tr['peak_mem_gb'])} |"
            )
    if result.get("dispatch"):
        lines += ["", _dispatch_markdown(result["dispatch"])]
    return "\n".join(lines)


def _dispatch_markdown(rows: list[dict]) -> str:
    lines = [
        "Host-side dispatch of one UNet call (SD 2.1 topology, tiny widths, 1 CPU thread):",
        "",
        "| LoRA | autocast | forward ops | forward ms | fwd+bwd ops | fwd+bwd ms |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for d in rows:
        fb = (
            f"{d['forward_backward_ops']} | {d['forward_backward_ms']:.1f}"
            if "forward_backward_ops" in d
            else "- | -"
        )
        lines.append(f"| {d['lora']} | {d['autocast']} | {d['forward_ops']} | {d['forward_ms']:.1f} | {fb} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, nargs="+", default=[1, 4, 50])
    ap.add_argument("--sample-batch", type=int, default=8, help="prompts per sampling call (2x trajectories)")
    ap.add_argument("--train-batches", type=int, nargs="+", default=[2, 8], help="pairs per training step")
    ap.add_argument("--repeats", type=int, default=4, help="timed sampling calls (halved at T > 8)")
    ap.add_argument("--train-repeats", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--decode-chunk", type=int, default=8)
    ap.add_argument("--lora-rank", type=int, default=4)
    ap.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    ap.add_argument(
        "--peak-tflops", type=float, default=None, help="peak dense TFLOP/s of the device's dtype"
    )
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument(
        "--no-profile",
        action="store_true",
        help="skip the torch.profiler pass (one sampling call and one training step at T=4)",
    )
    ap.add_argument(
        "--no-dispatch",
        action="store_true",
        help="skip the host-dispatch measurement (SD topology at tiny widths on one CPU thread, ~10 s)",
    )
    ap.add_argument(
        "--dispatch-only",
        action="store_true",
        help="only the host-dispatch measurement (CPU, seconds), e.g. --out bench/results/dispatch_cpu.json",
    )
    ap.add_argument("--out", default="bench/results/gpu.json")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny shrunken config (CI)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.steps, args.sample_batch, args.train_batches = [1, 3], 2, [1]
        args.repeats, args.train_repeats = 1, 1
    start = time.perf_counter()
    if args.dispatch_only:  # host-side cost of a UNet call on this machine's CPU, nothing else
        rows = dispatch_overhead(args.repeats)
        result = {
            "benchmark": "gpu_dispatch",
            "torch": torch.__version__,
            "python": platform.python_version(),
            "cpu": platform.processor(),
            "dispatch": rows,
            "wall_s": time.perf_counter() - start,
        }
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(markdown({"dispatch": rows}))
        return 0
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.smoke else "cpu"))
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU ({platform.processor() or 'cpu'})"
    )
    peak, source = peak_tflops(name, args.peak_tflops)
    print(f"device: {name}; peak {peak} TFLOP/s ({source})", flush=True)
    bench = Bench(args, device)
    rows = []
    for steps in args.steps:
        rows.append(bench.run_steps(steps, peak))
        r = rows[-1]
        print(
            f"T={steps}: {r['sampling_trajectories_per_s']:.2f} traj/s, train {r['train'][0]['steps_per_s']:.2f} "
            f"steps/s ({time.perf_counter() - start:.0f}s so far)",
            flush=True,
        )
    dispatch = None if args.no_dispatch else dispatch_overhead(2 if args.smoke else 5)
    prof = None
    if not args.no_profile:
        prof = profile(
            bench,
            min(4, max(args.steps)),
            args.train_batches[0],
            Path(args.out).with_name(Path(args.out).stem + "_profile.txt"),
        )
        print("profile:", json.dumps(prof), flush=True)
    import diffusers
    import transformers

    result = {
        "benchmark": "gpu",
        "smoke": args.smoke,
        "device": name,
        "peak_tflops": peak,
        "peak_source": source,
        "dtype": args.dtype,
        "resolution": bench.latent_shape[1] * 2 ** (len(bench.vae.config.block_out_channels) - 1),
        "unet_params": sum(p.numel() for p in bench.unet.parameters()),
        "lora_params": sum(p.numel() for p in bench.trainable),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "args": vars(args),
        "rows": rows,
        "profile": prof,
        "dispatch": dispatch,
        "wall_s": time.perf_counter() - start,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result))
    print(f"wrote {out} ({result['wall_s']:.0f}s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
