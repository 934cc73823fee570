"""Alignment: SDPO vs DDPO on the same base model, prompts and seeds, at two budgets.

Both methods start from the same base model (``model.pretrained`` of the pipeline) with the
same LoRA init, train prompts, sampling config and seeds, and are evaluated by
``sdpo_core.evaluation.evaluate.evaluate`` (the ``sdpo evaluate`` stage) on the held-out prompts at every
``evaluate.steps`` count with fixed noise seeds. Two budgets, compared separately:

* **equal trajectories**: SDPO and DDPO both train E epochs (the same trajectories per epoch);
* **equal reward queries**: SDPO queries 3 x0 per trajectory, DDPO 1, so DDPO trains 3E epochs.

DDPO runs its own update loop by default (``train.update_schedule: auto`` -> per_trajectory: each
batch's steps accumulated into one optimizer step, as in DDPO's code); ``--ddpo-set
train.update_schedule=per_step`` gives DDPO's loss in SDPO's per-step update loop instead.

DDPO's equal-trajectory model is the 3E run's snapshot after E epochs (the run is deterministic
and nothing in it depends on the epoch total, so this is exactly an E-epoch DDPO run).

Reported: eval reward before/after at each step count (mean over seeds, 95% t-interval over
seeds), SDPO - DDPO per seed, reward-vs-epoch and reward-vs-queries curves per step count from
a light per-epoch eval (PNG), and reward gain per wall-clock minute of training.

Run (in the background; ~25-40 min on 2 cores for the defaults)::

    nice -n 10 .venv/bin/python bench/alignment.py > bench/results/alignment.log 2>&1 &
    .venv/bin/python bench/alignment.py --smoke --out-dir /tmp/align   # tiny-random, 2 seeds, ~1 min
    .venv/bin/python bench/alignment.py --seeds 0 1 2 3 4 --epochs 12 --set train.learning_rate=1e-4
    .venv/bin/python bench/alignment.py --sdpo-set train.batch_size=4   # per-method overrides

Writes ``--out-dir`` (default bench/results/alignment): summary.json, alignment.md (tables),
curves.png; per-run eval.json files under ``runs/bench/`` (cached, see bench/common.py).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

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

QUERIES_PER_TRAJECTORY = {"sdpo": 3, "ddpo": 1}


def specs(
    pipeline: str,
    seed: int,
    epochs: int,
    extra: list[str],
    light_every: int,
    sdpo_extra: list[str] | None = None,
    ddpo_extra: list[str] | None = None,
    equal_queries: bool = True,
) -> dict[str, RunSpec]:
    """SDPO for ``epochs``; DDPO for 3x as many (equal queries) with a snapshot at ``epochs``
    (equal trajectories), or for ``epochs`` only when ``equal_queries`` is False."""
    ratio = QUERIES_PER_TRAJECTORY["sdpo"] // QUERIES_PER_TRAJECTORY["ddpo"] if equal_queries else 1
    return {
        "sdpo": RunSpec(
            f"sdpo-s{seed}",
            pipeline,
            ["train.method=sdpo", *extra, *(sdpo_extra or [])],
            seed,
            epochs,
            light_every,
        ),
        "ddpo": RunSpec(
            f"ddpo-s{seed}",
            pipeline,
            ["train.method=ddpo", *extra, *(ddpo_extra or [])],
            seed,
            ratio * epochs,
            light_every,
            snapshots=[epochs] if equal_queries else [],
        ),
    }


def run_all(args) -> dict:
    """Train and evaluate every (method, seed); returns {label: [per-seed result]}."""
    equal_queries = args.budgets == "both"
    out: dict[str, list[dict]] = {
        "sdpo": [],
        "ddpo_equal_traj": [],
        **({"ddpo_equal_queries": []} if equal_queries else {}),
    }
    for seed in args.seeds:
        sp = specs(
            args.pipeline,
            seed,
            args.epochs,
            args.set,
            args.light_every,
            args.sdpo_set,
            args.ddpo_set,
            equal_queries,
        )
        for method, spec in sp.items():
            rec = train_run(spec, fresh=args.fresh, run_root=args.run_root)
            run_dir = Path(rec["final"]).parent.parent
            ev = final_eval(spec, rec["final"], run_dir / "eval", fresh=args.fresh)
            entry = {"record": rec, "eval": ev, "epochs": spec.epochs}
            if method == "sdpo":
                out["sdpo"].append(entry)
                continue
            if not equal_queries:
                out["ddpo_equal_traj"].append(entry)
                continue
            out["ddpo_equal_queries"].append(entry)
            snap = rec["snapshots"][str(args.epochs)]
            ev_e = final_eval(spec, snap, run_dir / f"eval_epoch_{args.epochs}", fresh=args.fresh)
            hist = rec["history"][: args.epochs]
            out["ddpo_equal_traj"].append(
                {
                    "record": {
                        **rec,
                        "history": hist,
                        "train_seconds": sum(r["time/epoch"] for r in hist),
                        "queries": hist[-1]["queries_cum"],
                    },
                    "eval": ev_e,
                    "epochs": args.epochs,
                }
            )
    return out


def summarise(runs: dict, steps: list[int]) -> dict:
    """Per label and step count: base, trained, gain (mean over seeds + CI); per-minute rates."""
    summary: dict = {}
    for label, entries in runs.items():
        per_step = {}
        for n in steps:
            key = str(n)
            trained = [e["eval"]["steps"][key]["trained"]["mean"] for e in entries]
            base = [e["eval"]["steps"][key]["base"]["mean"] for e in entries]
            gain = [t - b for t, b in zip(trained, base, strict=True)]
            per_step[key] = {"base": base[0], "trained": seed_ci(trained), "gain": seed_ci(gain)}
            names = set.intersection(
                *(set(e["eval"]["steps"][key]["trained"].get("metrics", {})) for e in entries)
            )
            per_step[key]["metrics"] = {
                m: {
                    "base": entries[0]["eval"]["steps"][key]["base"]["metrics"][m],
                    "trained": seed_ci([e["eval"]["steps"][key]["trained"]["metrics"][m] for e in entries]),
                }
                for m in sorted(names)
            }
        minutes = [e["record"]["train_seconds"] / 60 for e in entries]
        # the machine is shared: the median epoch time x epochs is less sensitive to load spikes
        median_epoch = [statistics.median(h["time/epoch"] for h in e["record"]["history"]) for e in entries]
        robust_minutes = [m * e["epochs"] / 60 for m, e in zip(median_epoch, entries, strict=True)]
        gains_mean = [sum(e["eval"]["steps"][str(n)]["gain"] for n in steps) / len(steps) for e in entries]
        t_key = str(entries[0]["record"]["train_steps"])
        gains_t = [e["eval"]["steps"][t_key]["gain"] for e in entries] if t_key in per_step else gains_mean
        summary[label] = {
            "epochs": entries[0]["epochs"],
            "steps": per_step,
            "train_minutes": seed_ci(minutes),
            "queries": sum(e["record"]["queries"] for e in entries) / len(entries),
            "trajectories": entries[0]["epochs"] * entries[0]["record"]["trajectories_per_epoch"],
            "gain_mean_over_steps": seed_ci(gains_mean),
            "gain_per_minute_mean_over_steps": seed_ci(
                [g / m for g, m in zip(gains_mean, minutes, strict=True)]
            ),
            "gain_per_minute_at_train_steps": seed_ci([g / m for g, m in zip(gains_t, minutes, strict=True)]),
            "median_epoch_seconds": median_epoch,
            "gain_per_robust_minute_mean_over_steps": seed_ci(
                [g / m for g, m in zip(gains_mean, robust_minutes, strict=True)]
            ),
        }
    for budget, ddpo in (("equal_traj", "ddpo_equal_traj"), ("equal_queries", "ddpo_equal_queries")):
        if ddpo not in runs:
            continue
        summary[f"sdpo_minus_ddpo_{budget}"] = {
            str(n): seed_ci(
                [
                    s["eval"]["steps"][str(n)]["trained"]["mean"]
                    - d["eval"]["steps"][str(n)]["trained"]["mean"]
                    for s, d in zip(runs["sdpo"], runs[ddpo], strict=True)
                ]
            )
            for n in steps
        }
    return summary


def curves_png(runs: dict, steps: list[int], path: Path) -> None:
    """Light-eval reward vs epoch (top row) and vs reward queries (bottom row), one column per step count."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4 * len(steps), 7), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, len(steps), squeeze=False)
    ddpo = "ddpo_equal_queries" if "ddpo_equal_queries" in runs else "ddpo_equal_traj"
    colours = {"sdpo": "tab:blue", ddpo: "tab:orange"}
    for col, n in enumerate(steps):
        for label, colour in colours.items():
            entries = runs[label]
            curves = np.array(
                [
                    [e["record"]["light_base"][str(n)]] + [h["light"][str(n)] for h in e["record"]["history"]]
                    for e in entries
                ]
            )
            queries = np.array([0] + [h["queries_cum"] for h in entries[0]["record"]["history"]])
            epochs = np.arange(curves.shape[1])
            mean, lo, hi = curves.mean(0), curves.min(0), curves.max(0)
            name = "SDPO" if label == "sdpo" else "DDPO"
            for row, x in ((0, epochs), (1, queries)):
                ax = axes[row][col]
                ax.plot(x, mean, color=colour, label=f"{name} (mean of {len(entries)} seeds)")
                ax.fill_between(x, lo, hi, color=colour, alpha=0.2, linewidth=0)
        e_sdpo = runs["sdpo"][0]["epochs"]
        axes[0][col].axvline(e_sdpo, color="gray", linestyle=":", linewidth=1)
        axes[0][col].set_title(f"{n} step{'s' if n > 1 else ''}")
        axes[0][col].set_xlabel("epoch")
        axes[1][col].set_xlabel("reward-model queries")
        for row in range(2):
            axes[row][col].grid(alpha=0.3)
        if col == 0:
            axes[0][col].set_ylabel("light-eval reward")
            axes[1][col].set_ylabel("light-eval reward")
            axes[0][col].legend(fontsize=8)
    fig.suptitle("eval reward during training (band: min-max over seeds; dotted: SDPO's last epoch)")
    fig.tight_layout()
    fig.savefig(path)


def markdown(summary: dict, steps: list[int], meta: dict) -> str:
    sets = " ".join(f"`{o}`" for o in meta["overrides"]) or "none"
    per = "".join(
        f"; {m} only: " + " ".join(f"`{o}`" for o in meta[f"{m.lower()}_overrides"])
        for m in ("SDPO", "DDPO")
        if meta[f"{m.lower()}_overrides"]
    )
    lines = [
        f"pipeline `{meta['pipeline']}`, overrides {sets}{per}; seeds {meta['seeds']}, SDPO {meta['epochs']} "
        "epochs; eval reward, mean over seeds [95% t-interval over seeds]",
        "",
    ]
    for title, ddpo, diff in (
        ("Equal sampled trajectories", "ddpo_equal_traj", "sdpo_minus_ddpo_equal_traj"),
        ("Equal reward-model queries", "ddpo_equal_queries", "sdpo_minus_ddpo_equal_queries"),
    ):
        if ddpo not in summary:
            continue
        s, d = summary["sdpo"], summary[ddpo]
        lines += [
            f"### {title} (SDPO {s['epochs']} epochs, {s['trajectories']} trajectories, {s['queries']:.0f} "
            f"queries; DDPO {d['epochs']} epochs, {d['trajectories']} trajectories, {d['queries']:.0f} queries)",
            "",
            "| steps | base | SDPO | DDPO | SDPO - DDPO |",
            "|---:|---:|---:|---:|---:|",
        ]
        for n in steps:
            k = str(n)
            lines.append(
                f"| {n} | {s['steps'][k]['base']:.3f} | {fmt_ci(s['steps'][k]['trained'])} | "
                f"{fmt_ci(d['steps'][k]['trained'])} | {fmt_ci(summary[diff][k], sign=True)} |"
            )
        lines.append("")
    metrics = sorted(summary["sdpo"]["steps"][str(steps[0])]["metrics"])
    if metrics:
        lines += [
            "### Evaluation metrics (base -> trained, mean over seeds)",
            "",
            "| steps | metric | base | SDPO | DDPO, equal trajectories | DDPO, equal queries |",
            "|---:|---|---:|---:|---:|---:|",
        ]
        for n in steps:
            for m in metrics:
                row = [
                    summary[label]["steps"][str(n)]["metrics"].get(m) if label in summary else None
                    for label in ("sdpo", "ddpo_equal_traj", "ddpo_equal_queries")
                ]
                if row[0] is None:
                    continue
                lines.append(
                    f"| {n} | {m} | {row[0]['base']:.3f} | "
                    + " | ".join(fmt_ci(r["trained"]) if r else "-" for r in row)
                    + " |"
                )
        lines.append("")
    lines += [
        "### Reward per wall-clock minute of training",
        "",
        "| run | epochs | train min | median s / epoch | mean gain over steps | gain / min (mean over steps) | "
        "gain / min (at the training step count) | gain / (epochs x median epoch) min |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, name in (
        ("sdpo", "SDPO"),
        ("ddpo_equal_traj", "DDPO, equal trajectories"),
        ("ddpo_equal_queries", "DDPO, equal queries"),
    ):
        if label not in summary:
            continue
        s = summary[label]
        lines.append(
            f"| {name} | {s['epochs']} | {s['train_minutes']['mean']:.2f} | "
            f"{statistics.median(s['median_epoch_seconds']):.2f} | "
            f"{fmt_ci(s['gain_mean_over_steps'], sign=True)} | "
            f"{fmt_ci(s['gain_per_minute_mean_over_steps'], sign=True)} | "
            f"{fmt_ci(s['gain_per_minute_at_train_steps'], sign=True)} | "
            f"{fmt_ci(s['gain_per_robust_minute_mean_over_steps'], sign=True)} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pipeline", default="digits-tiny")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument(
        "--epochs", type=int, default=20, help="SDPO epochs (DDPO: the same, and 3x for equal queries)"
    )
    ap.add_argument("--light-every", type=int, default=1, help="epochs between light evaluations")
    ap.add_argument(
        "--budgets",
        choices=["both", "traj"],
        default="both",
        help="traj: equal trajectories only (DDPO trains --epochs, no 3x run)",
    )
    ap.add_argument("--set", action="append", default=[], help="config override for both methods, key=value")
    ap.add_argument("--sdpo-set", action="append", default=[], help="config override for SDPO only")
    ap.add_argument("--ddpo-set", action="append", default=[], help="config override for DDPO only")
    ap.add_argument("--out-dir", type=Path, default=Path("bench/results/alignment"))
    ap.add_argument("--run-root", type=Path, default=RUN_ROOT)
    ap.add_argument("--fresh", action="store_true", help="retrain even if a cached run exists")
    ap.add_argument("--smoke", action="store_true", help="tiny-random, 2 seeds, 1 epoch (CI)")
    args = ap.parse_args(argv)
    if args.smoke:
        import tempfile

        args.pipeline, args.seeds, args.epochs = "tiny-random", [0, 1], 1
        args.run_root = Path(tempfile.mkdtemp(prefix="sdpo-bench-"))
        args.set = [f"model.pretrained={args.run_root / 'base'}", "evaluate.num_prompts=2", *args.set]
    setup_logging()
    freeze_pipelines(args.out_dir)
    runs = run_all(args)
    steps = sorted(int(k) for k in runs["sdpo"][0]["eval"]["steps"])
    summary = summarise(runs, steps)
    meta = {
        "pipeline": args.pipeline,
        "seeds": args.seeds,
        "epochs": args.epochs,
        "overrides": args.set,
        "sdpo_overrides": args.sdpo_set,
        "ddpo_overrides": args.ddpo_set,
        "smoke": args.smoke,
        "argv": sys.argv[1:],
        "machine": machine_info(),
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    curves_png(runs, steps, args.out_dir / "curves.png")
    per_run = {
        label: [
            {
                "seed": e["record"]["seed"],
                "epochs": e["epochs"],
                "train_seconds": e["record"]["train_seconds"],
                "queries": e["record"]["queries"],
                "light_base": e["record"]["light_base"],
                "history": e["record"]["history"],
                "eval": {
                    k: {m: v[m]["mean"] for m in ("base", "trained")} | {"gain": v["gain"]}
                    for k, v in e["eval"]["steps"].items()
                },
            }
            for e in entries
        ]
        for label, entries in runs.items()
    }
    (args.out_dir / "summary.json").write_text(
        json.dumps({"meta": meta, "summary": summary, "runs": per_run}, indent=2) + "\n"
    )
    text = markdown(summary, steps, meta)
    (args.out_dir / "alignment.md").write_text(text + "\n")
    print(text)
    if args.smoke:  # the smoke run's models and base live in a temp dir
        import shutil

        shutil.rmtree(args.run_root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
