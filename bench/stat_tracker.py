"""Per-step, per-prompt stat tracker: the vectorised tracker against the reference loop.

Feeds the same stream of batches (random returns of N samples x T steps over P prompts, several
rounds so that both the batch-statistics phase and the buffer phase are exercised) to
``PerStepPromptStatTracker.update`` and to ``reference_per_prompt_advantages`` (the paper code's
per-prompt, per-step loop), checks that they give the same advantages (max abs difference),
and times both (median over rounds of the per-update wall time).

Run::

    .venv/bin/python bench/stat_tracker.py                 # full sizes, ~1-2 min on 2 cores
    .venv/bin/python bench/stat_tracker.py --smoke         # tiny sizes, seconds
    .venv/bin/python bench/stat_tracker.py --sizes 4096x50x1000 --rounds 6

Writes ``--out`` (default bench/results/stat_tracker.json) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from sdpo_core.rl.advantages import PerStepPromptStatTracker, reference_per_prompt_advantages

DEFAULT_SIZES = ["256x4x32", "1024x16x256", "4096x50x1000"]
SMOKE_SIZES = ["64x4x16", "128x8x32"]


def parse_size(text: str) -> tuple[int, int, int]:
    """'NxTxP' -> (samples N, steps T, prompts P)."""
    n, t, p = (int(v) for v in text.lower().split("x"))
    return n, t, p


def run_size(n: int, t: int, p: int, rounds: int, buffer_size: int, min_count: int, seed: int) -> dict:
    """Feed ``rounds`` batches of (N, T) returns to both implementations; time and compare them."""
    rng = np.random.default_rng(seed)
    prompts_all = [f"prompt {i}" for i in range(p)]
    tracker = PerStepPromptStatTracker(buffer_size, min_count, t)
    history: dict = {}
    t_vec, t_ref, max_diff, used_buffer = [], [], 0.0, []
    for _ in range(rounds):
        prompts = [prompts_all[i] for i in rng.integers(0, p, n)]
        # returns with a per-prompt offset, so that per-prompt statistics differ from batch ones
        offset = rng.normal(size=p)[[int(s.split()[1]) for s in prompts]]
        returns = rng.normal(size=(n, t)) + offset[:, None]
        start = time.perf_counter()
        adv_vec = tracker.update(prompts, torch.from_numpy(returns))
        t_vec.append(time.perf_counter() - start)
        start = time.perf_counter()
        adv_ref = reference_per_prompt_advantages(prompts, returns, history, buffer_size, min_count)
        t_ref.append(time.perf_counter() - start)
        max_diff = max(max_diff, float(np.abs(adv_vec.double().numpy() - adv_ref).max()))
        rows = torch.tensor([tracker.prompt_index[p] for p in prompts])  # every prompt is known after update
        used_buffer.append(float((tracker.count[rows] >= min_count).double().mean()))
    vec, ref = statistics.median(t_vec), statistics.median(t_ref)
    return {
        "samples": n,
        "steps": t,
        "prompts": p,
        "rounds": rounds,
        "vectorised_s": vec,
        "reference_s": ref,
        "speedup": ref / vec,
        "max_abs_diff": max_diff,
        "share_from_buffer_last_round": used_buffer[-1],
    }


def markdown(rows: list[dict]) -> str:
    lines = [
        "| samples x steps x prompts | vectorised (ms/update) | reference loop (ms/update) | speed-up | "
        "max abs diff | from buffer (last round) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['samples']} x {r['steps']} x {r['prompts']} | {1e3 * r['vectorised_s']:.2f} | "
            f"{1e3 * r['reference_s']:.1f} | {r['speedup']:.0f}x | {r['max_abs_diff']:.1e} | "
            f"{100 * r['share_from_buffer_last_round']:.0f}% |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=None, help="NxTxP sizes (samples x steps x prompts)")
    ap.add_argument("--rounds", type=int, default=6, help="successive updates per size")
    ap.add_argument("--buffer-size", type=int, default=32)
    ap.add_argument("--min-count", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (1: the reference loop is single-threaded numpy, and on a busy "
        "2-core machine two OpenMP threads wait on each other for ~20 ms per small update)",
    )
    ap.add_argument("--out", default="bench/results/stat_tracker.json")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes (CI)")
    args = ap.parse_args(argv)
    sizes = args.sizes or (SMOKE_SIZES if args.smoke else DEFAULT_SIZES)
    min_count = min(args.min_count, 4) if args.smoke else args.min_count
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    rows = []
    for text in sizes:
        row = run_size(*parse_size(text), args.rounds, args.buffer_size, min_count, args.seed)
        rows.append(row)
        print(
            f"{text}: vectorised {1e3 * row['vectorised_s']:.2f} ms, reference {1e3 * row['reference_s']:.1f} ms, "
            f"x{row['speedup']:.0f}, max diff {row['max_abs_diff']:.1e}",
            flush=True,
        )
    result = {
        "benchmark": "stat_tracker",
        "smoke": args.smoke,
        "buffer_size": args.buffer_size,
        "min_count": min_count,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "load_avg_1min_before": load_before,
        "rows": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(rows))
    bad = [r for r in rows if r["max_abs_diff"] > 1e-4]
    if bad:
        print(f"MISMATCH: the two implementations disagree on {len(bad)} size(s)")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
