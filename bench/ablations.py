"""Ablations of SDPO's parts, each a config override that exists, on the alignment task.

| variant | override |
|---|---|
| full SDPO | (none) |
| no dense rewards (final reward at every step) | ``train.dense_reward=false`` |
| no anchor (first + last only) | ``train.anchor=false`` |
| no step shuffling | ``train.shuffle_timesteps=false`` |
| no temporal weights | ``train.lam=1.0`` |
| no clipping | ``train.clip_range=0`` |

Every variant trains from the same base with the same seeds and epochs as ``alignment.py``'s
SDPO runs (the full-SDPO runs are shared with it through the run cache, bench/common.py) and
is evaluated by ``sdpo_core.evaluation.evaluate.evaluate`` at every ``evaluate.steps`` count. One table:
mean eval reward over seeds [95% t-interval], and the change against full SDPO (paired by seed).

Run (in the background, after or before alignment.py; ~20-30 min on 2 cores)::

    nice -n 10 .venv/bin/python bench/ablations.py > bench/results/ablations.log 2>&1 &
    .venv/bin/python bench/ablations.py --smoke --out-dir /tmp/abl      # tiny-random, 2 seeds
    .venv/bin/python bench/ablations.py --variants full no_anchor --seeds 0 1 2 3

Writes ``--out-dir`` (default bench/results/ablations): summary.json and ablations.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from alignment import specs  # noqa: E402
from common import (  # noqa: E402
    RUN_ROOT,
    RunSpec,
    final_eval,
    fmt_ci,
    freeze_pipelines,
    machine_info,
    seed_ci,
    setup_logging,
    train_run,
)

VARIANTS = {
    "full": ("full SDPO", []),
    "no_dense": ("no dense rewards", ["train.dense_reward=false"]),
    "no_anchor": ("no anchor", ["train.anchor=false"]),
    "no_shuffle": ("no step shuffling", ["train.shuffle_timesteps=false"]),
    "no_temporal_weights": ("no temporal weights (lam 1)", ["train.lam=1.0"]),
    "no_clip": ("no clipping", ["train.clip_range=0"]),
}


def variant_spec(
    variant: str, pipeline: str, seed: int, epochs: int, extra: list[str], light_every: int
) -> RunSpec:
    full = specs(pipeline, seed, epochs, extra, light_every)["sdpo"]
    if variant == "full":
        return full  # the same run (and cache entry) as alignment.py's SDPO
    _, overrides = VARIANTS[variant]
    return RunSpec(f"{variant}-s{seed}", pipeline, [*full.overrides, *overrides], seed, epochs, light_every)


def markdown(results: dict, steps: list[int], meta: dict) -> str:
    head = (
        "| variant | " + " | ".join(f"{n} step{'s' if n > 1 else ''}" for n in steps) + " | mean over steps |"
    )
    sets = " ".join(f"`{o}`" for o in meta["overrides"]) or "none"
    lines = [
        f"pipeline `{meta['pipeline']}`, overrides {sets}; seeds {meta['seeds']}, {meta['epochs']} epochs; eval "
        "reward, mean over seeds [95% t-interval]; second line: change against full SDPO, paired by seed",
        "",
        head,
        "|---|" + "---:|" * (len(steps) + 1),
    ]
    base = results[next(iter(results))]["base"]
    lines.append(
        "| base model | " + " | ".join(f"{base[str(n)]:.3f}" for n in steps) + " | "
        f"{sum(base[str(n)] for n in steps) / len(steps):.3f} |"
    )
    for variant, r in results.items():
        lines.append(
            f"| {VARIANTS[variant][0]} | "
            + " | ".join(fmt_ci(r["trained"][str(n)]) for n in steps)
            + f" | {fmt_ci(r['mean_over_steps'])} |"
        )
        if variant != "full" and "delta" in r:
            lines.append(
                "| &nbsp;&nbsp;vs full | "
                + " | ".join(fmt_ci(r["delta"][str(n)], sign=True) for n in steps)
                + f" | {fmt_ci(r['delta_mean_over_steps'], sign=True)} |"
            )
    metrics = sorted(set.intersection(*(set(r.get("metrics_mean_over_steps", {})) for r in results.values())))
    if metrics:
        base_m = results[next(iter(results))]["base_metrics_mean_over_steps"]
        lines += [
            "",
            "Evaluation metrics, mean over step counts (mean over seeds [95% t-interval]):",
            "",
            "| variant | " + " | ".join(metrics) + " |",
            "|---|" + "---:|" * len(metrics),
            "| base model | " + " | ".join(f"{base_m[m]:.3f}" for m in metrics) + " |",
        ]
        for variant, r in results.items():
            lines.append(
                f"| {VARIANTS[variant][0]} | "
                + " | ".join(fmt_ci(r["metrics_mean_over_steps"][m]) for m in metrics)
                + " |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pipeline", default="digits-tiny")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--light-every", type=int, default=1)
    ap.add_argument("--set", action="append", default=[], help="config override for every variant, key=value")
    ap.add_argument("--out-dir", type=Path, default=Path("bench/results/ablations"))
    ap.add_argument("--run-root", type=Path, default=RUN_ROOT)
    ap.add_argument("--fresh", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="tiny-random, 2 seeds, 1 epoch, 3 variants (CI)")
    args = ap.parse_args(argv)
    if args.smoke:
        import tempfile

        args.pipeline, args.seeds, args.epochs = "tiny-random", [0, 1], 1
        args.variants = ["full", "no_dense", "no_clip"]
        args.run_root = Path(tempfile.mkdtemp(prefix="sdpo-bench-"))
        args.set = [f"model.pretrained={args.run_root / 'base'}", "evaluate.num_prompts=2", *args.set]
    if "full" not in args.variants:
        args.variants = ["full", *args.variants]
    setup_logging()
    freeze_pipelines(args.out_dir)
    evals: dict[str, list[dict]] = {}
    records: dict[str, list[dict]] = {}
    for seed in args.seeds:
        for variant in args.variants:
            spec = variant_spec(variant, args.pipeline, seed, args.epochs, args.set, args.light_every)
            rec = train_run(spec, fresh=args.fresh, run_root=args.run_root)
            ev = final_eval(spec, rec["final"], Path(rec["final"]).parent.parent / "eval", fresh=args.fresh)
            evals.setdefault(variant, []).append(ev)
            records.setdefault(variant, []).append(rec)
    steps = sorted(int(k) for k in evals["full"][0]["steps"])

    def trained(variant: str, n: int) -> list[float]:
        return [e["steps"][str(n)]["trained"]["mean"] for e in evals[variant]]

    def mean_over(variant: str) -> list[float]:
        return [sum(v) / len(v) for v in zip(*(trained(variant, n) for n in steps), strict=True)]

    results = {}
    for variant in args.variants:
        r = {
            "label": VARIANTS[variant][0],
            "overrides": VARIANTS[variant][1],
            "base": {str(n): evals[variant][0]["steps"][str(n)]["base"]["mean"] for n in steps},
            "trained": {str(n): seed_ci(trained(variant, n)) for n in steps},
            "mean_over_steps": seed_ci(mean_over(variant)),
            "train_minutes": sum(rec["train_seconds"] for rec in records[variant])
            / len(records[variant])
            / 60,
            "queries": sum(rec["queries"] for rec in records[variant]) / len(records[variant]),
        }
        names = set.intersection(
            *(set(e["steps"][str(steps[0])]["trained"].get("metrics", {})) for e in evals[variant])
        )
        r["metrics_mean_over_steps"] = {
            m: seed_ci(
                [
                    sum(e["steps"][str(n)]["trained"]["metrics"][m] for n in steps) / len(steps)
                    for e in evals[variant]
                ]
            )
            for m in sorted(names)
        }
        r["base_metrics_mean_over_steps"] = {
            m: sum(evals[variant][0]["steps"][str(n)]["base"]["metrics"][m] for n in steps) / len(steps)
            for m in sorted(names)
        }
        if variant != "full":
            r["delta"] = {
                str(n): seed_ci([a - b for a, b in zip(trained(variant, n), trained("full", n), strict=True)])
                for n in steps
            }
            r["delta_mean_over_steps"] = seed_ci(
                [a - b for a, b in zip(mean_over(variant), mean_over("full"), strict=True)]
            )
        results[variant] = r
    meta = {
        "pipeline": args.pipeline,
        "seeds": args.seeds,
        "epochs": args.epochs,
        "overrides": args.set,
        "smoke": args.smoke,
        "argv": sys.argv[1:],
        "machine": machine_info(),
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "summary.json").write_text(
        json.dumps({"meta": meta, "results": results}, indent=2) + "\n"
    )
    text = markdown(results, steps, meta)
    (args.out_dir / "ablations.md").write_text(text + "\n")
    print(text)
    if args.smoke:  # the smoke run's models and base live in a temp dir
        import shutil

        shutil.rmtree(args.run_root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
