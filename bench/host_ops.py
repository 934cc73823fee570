"""Host work per denoiser call: aten operations and host milliseconds, per family, on the CPU.

On a GPU every aten operation is at least one kernel launch, so the count of operations a denoiser
call dispatches bounds how fast the host can feed the device whatever the model's size; the count is
machine-independent (the CPU shows the same dispatch as a GPU would). For each family's tiny
pipeline (the ``--smoke`` pipelines of ``bench/gpu_models.py``, written with ``save_pretrained``),
a ``Trainer`` is built as ``bench/gpu.py`` builds it (LoRA rank 4, the family and sampler read
from the directory), one epoch is sampled with ``Trainer.sample_epoch``, and then, calling the
trainer's own functions only:

  * forward: ``trainer.policy.denoise`` (the sampling path's denoiser call) under ``no_grad`` on
    the sampled latents of step 0, the model in eval mode;
  * forward+backward: ``trainer.updater.batch_loss`` (the training step's denoiser call, the
    sampler's log-prob and the method's loss) on ``train.batch_size`` pairs at step 0, then
    ``trainer.acc.backward``, the model in train mode.

Ops: ``aten::`` events under ``torch.profiler`` (CPU activity) for one call after warm-up. ms: the
median of ``--repeats`` timed calls without the profiler (noisy on a shared machine; one thread by
default). Precisions: float32 (``model.mixed_precision=no``) and bf16.

Run::

    python bench/host_ops.py --out bench/results/host_ops.json
    python bench/host_ops.py --smoke --out /tmp/host_ops.json   # CI: one family, float32, 2 repeats
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from accelerate.state import AcceleratorState  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from bench.gpu import DTYPES, make_trainer  # noqa: E402
from bench.gpu_models import CASES, build_pipeline  # noqa: E402


def aten_ops(fn) -> int:
    """aten:: events dispatched by one call of ``fn`` (nested ones included, as each may launch)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(1 for e in prof.events() if e.name.startswith("aten::"))


def median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def calls(tr):
    """(forward, forward+backward): the trainer's own sampling call and training step on its samples."""
    s = tr.sample_epoch(0).samples
    model = tr.acc.unwrap_model(tr.denoiser)
    x, t, cond = s.latents[0][:, 0].to(tr.acc.device), tr.policy.timesteps[0], s.cond.to(tr.acc.device)
    rows = torch.arange(min(tr.cfg.train.batch_size, len(s.cond)))
    steps = torch.zeros_like(rows)

    def forward():
        model.eval()
        with torch.no_grad():
            tr.policy.denoise(x, t, cond)

    def forward_backward():
        model.train()
        loss, _ = tr.updater.batch_loss(s, rows, steps)
        tr.acc.backward(loss)
        tr.optimizer.zero_grad(set_to_none=True)

    return forward, forward_backward


def measure(name: str, precision: str, args, work: Path) -> dict:
    case = CASES[name]
    model_dir = work / f"{name}-{precision}"
    build_pipeline(case, True, torch.device("cpu"), DTYPES[precision]).save_pretrained(model_dir)
    targs = SimpleNamespace(smoke=True, mixed_precision=precision, gradient_checkpointing=False, lora_rank=4,
                            steps=2, sample_batch=2, sample_batches=1, train_batch=1, resolution=None)
    AcceleratorState._reset_state(reset_partial_state=True)  # the next precision needs a new Accelerator
    tr = make_trainer(model_dir, case, targs, work / f"{name}-{precision}-run")
    try:
        row = {"case": name, "family": type(tr.family).__name__, "precision": precision}
        for label, fn in zip(("forward", "fwd_bwd"), calls(tr), strict=True):
            fn()  # warm-up
            row[f"{label}_ops"] = aten_ops(fn)
            row[f"{label}_ms"] = median_ms(fn, args.repeats)
    finally:
        tr.close()
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", choices=[*CASES, "all"], default="all")
    ap.add_argument("--precision", choices=["no", "bf16", "both"], default="both")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="bench/results/host_ops.json")
    ap.add_argument("--smoke", action="store_true", help="one family, float32, 2 repeats (CI)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.case, args.precision, args.repeats = "sd-turbo", "no", 2
    torch.set_num_threads(args.threads)
    names = list(CASES) if args.case == "all" else [args.case]
    precisions = ["no", "bf16"] if args.precision == "both" else [args.precision]
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="sdpo-host-ops-") as tmp:
        rows = [measure(n, p, args, Path(tmp)) for n in names for p in precisions]
    result = {"benchmark": "host_ops", "smoke": args.smoke, "torch": torch.__version__,
              "device": f"CPU ({platform.processor() or 'cpu'}, {args.threads} threads)", "repeats": args.repeats,
              "rows": rows, "wall_s": time.perf_counter() - start}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print("| case | precision | forward ops | forward ms | fwd+bwd ops | fwd+bwd ms |\n|---|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['case']} | {r['precision']} | {r['forward_ops']} | {r['forward_ms']:.1f} | {r['fwd_bwd_ops']} | "
              f"{r['fwd_bwd_ms']:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
