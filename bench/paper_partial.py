"""The comparisons of ``paper_regime.py`` from runs still in progress (or stopped): equal reward
queries and equal training time, read from each run's per-epoch rows (``history.jsonl``: light
evaluation, cumulative queries, epoch time) and its per-epoch snapshots.

A run of ``paper_regime.py`` writes its ``record.json`` only when all its epochs are done; this
script needs only the epochs done so far. Per budget, each method's model is its snapshot at the
last epoch within the budget, the budget being the smallest any method has reached:

* **equal queries**: the fewest reward queries any method has made so far;
* **equal time**: the least training time (epochs done x the run's median epoch time) any method
  has spent so far.

Reported per seed and mean over seeds: the light-eval reward (20 eval prompts x 1 sample, fixed
seeds) at each step count, and with ``--eval`` the ``sdpo evaluate`` numbers of those snapshots
(gain over base with its 95% interval, over seeds with 2+ seeds, else over the 80 paired eval
samples; digit accuracy and diversity), plus the curves (PNG) of ``paper_regime.py``.

    .venv/bin/python bench/paper_partial.py --pipeline digits-flow-tiny --train-steps 16 --seeds 0 --eval
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RUN_ROOT, final_eval, fmt_ci, freeze_pipelines, seed_ci, setup_logging  # noqa: E402
from paper_regime import LABELS, METHODS, _acc_div, curves_png, spec  # noqa: E402


def partial_run(sp, run_root: Path) -> dict | None:
    """The run's rows so far as a paper_regime entry's record, or None when it has none."""
    run_dir = run_root / f"{sp.name}-{sp.key()}"
    rows = []
    if (run_dir / "history.jsonl").is_file():
        for line in (run_dir / "history.jsonl").read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                break
    if not rows or not (run_dir / "light_base.json").is_file():
        return None
    rec = {"light_base": json.loads((run_dir / "light_base.json").read_text()), "history": rows,
           "trajectories_per_epoch": 64, "run_dir": str(run_dir), "seed": sp.seed}
    if (run_dir / "record.json").is_file():
        rec["trajectories_per_epoch"] = json.loads((run_dir / "record.json").read_text())["trajectories_per_epoch"]
    return rec


def model_at(sp, rec: dict, e: int) -> Path:
    run_dir = Path(rec["run_dir"])
    if e == sp.epochs:
        return Path(json.loads((run_dir / "record.json").read_text())["final"])
    return run_dir / f"epoch_{e}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pipeline", default="digits-tiny-paper")
    ap.add_argument("--train-steps", type=int, default=50)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--epochs", type=int, default=12, help="the runs' planned epochs (their cache key)")
    ap.add_argument("--methods", nargs="+", choices=list(METHODS), default=["sdpo", "nft", "grpo", "ddpo"])
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--eval", action="store_true", help="sdpo evaluate the budget snapshots (accuracy, diversity)")
    ap.add_argument("--out-dir", type=Path, default=Path("bench/results/paper_partial"))
    ap.add_argument("--run-root", type=Path, default=RUN_ROOT)
    args = ap.parse_args(argv)
    setup_logging()
    freeze_pipelines(args.out_dir)
    t = args.train_steps
    runs: dict[str, list[tuple]] = {}
    for m in args.methods:
        for seed in args.seeds:
            sp = spec(args.pipeline, t, m, seed, args.epochs, args.set)
            rec = partial_run(sp, args.run_root)
            if rec is None:
                sys.exit(f"{sp.name}: no epoch done yet under {args.run_root}")
            runs.setdefault(m, []).append((sp, rec))
    med = {m: [float(np.median([h["time/epoch"] for h in r["history"]])) for _, r in v] for m, v in runs.items()}
    q_budget = min(r["history"][-1]["queries_cum"] for v in runs.values() for _, r in v)
    t_budget = min(len(r["history"]) * s for m, v in runs.items() for (_, r), s in zip(v, med[m], strict=True))
    lines = [f"pipeline `{args.pipeline}`, T = {t}, seeds {args.seeds}; epochs done: "
             + ", ".join(f"{LABELS[m]} {min(len(r['history']) for _, r in v)}" for m, v in runs.items())
             + f" (of {args.epochs}); command `python bench/paper_partial.py {' '.join(sys.argv[1:])}`", ""]
    result: dict = {"q_budget": q_budget, "t_budget_s": t_budget, "budgets": {}}
    steps = [int(k) for k in next(iter(runs.values()))[0][1]["light_base"]]
    for budget, title in (("queries", f"Equal reward queries (<= {q_budget})"),
                          ("time", f"Equal training time (<= {t_budget / 60:.2f} min, epochs x median epoch time)")):
        rows, res = [], {}
        for m, v in runs.items():
            picks = []
            for (sp, rec), s in zip(v, med[m], strict=True):
                h = rec["history"]
                if budget == "queries":
                    e = max([1] + [i + 1 for i, row in enumerate(h) if row["queries_cum"] <= q_budget])
                else:
                    e = int(np.clip(np.floor(t_budget / s + 1e-6), 1, len(h)))
                pick = {"seed": sp.seed, "epoch": e, "queries": h[e - 1]["queries_cum"], "minutes": e * s / 60,
                        "light_gain": {k: h[e - 1]["light"][k] - rec["light_base"][k] for k in rec["light_base"]}}
                if args.eval:
                    ev = final_eval(sp, model_at(sp, rec, e), Path(rec["run_dir"]) / ("eval" if e == sp.epochs
                                                                                       else f"eval_epoch_{e}"))
                    pick["eval"] = ev["steps"]
                picks.append(pick)
            res[m] = picks
            cells = []
            for n in steps:
                k = str(n)
                light = seed_ci([p["light_gain"][k] for p in picks])
                cell = f"light {fmt_ci(light, sign=True)}"
                if args.eval:
                    gains = [p["eval"][k]["gain"] for p in picks]
                    g = (seed_ci(gains) if len(gains) > 1 else
                         {"mean": gains[0], "lo": picks[0]["eval"][k]["gain_ci95"][0],
                          "hi": picks[0]["eval"][k]["gain_ci95"][1], "n": 2})
                    acc = {"steps": {k: {"metrics": {x: {"trained": seed_ci(
                        [p["eval"][k]["trained"]["metrics"][x] for p in picks])}
                        for x in picks[0]["eval"][k]["trained"].get("metrics", {})}}}}
                    cell = f"**{fmt_ci(g, sign=True)}** ({_acc_div(acc, k)}); {cell}"
                cells.append(cell)
            ep = "/".join(str(p["epoch"]) for p in picks)
            qs = np.mean([p["queries"] for p in picks])
            mins = np.mean([p["minutes"] for p in picks])
            rows.append(f"| {LABELS[m]} | {ep} | {qs:.0f} | {mins:.2f} | " + " | ".join(cells) + " |")
        result["budgets"][budget] = res
        lines += [f"### {title}", "",
                  "Gain over base: `sdpo evaluate` (40 prompts x 2 samples) [95% interval: over seeds, or with one "
                  "seed over the 80 paired samples] (digit accuracy / diversity); light eval (20 x 1) gain:", "",
                  "| method | epoch (per seed) | queries | train min | "
                  + " | ".join(f"{n} step{'s' * (n > 1)}" for n in steps) + " |",
                  "|---|---:|---:|---:|" + "---:|" * len(steps), *rows, ""]
    if args.eval:
        ev = result["budgets"]["queries"][next(iter(runs))][0]["eval"]
        lines.append("Base (`sdpo evaluate`): " + ", ".join(
            f"{n} step{'s' * (n > 1)} {ev[str(n)]['base']['mean']:.3f} (acc / div "
            f"{' / '.join(f'{v:.3f}' for v in ev[str(n)]['base'].get('metrics', {}).values())})" for n in steps))
        lines.append("")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    entries = {m: [{"record": r} for _, r in v] for m, v in runs.items()}
    # curves to the epochs every seed of a method has done
    for es in entries.values():
        done = min(len(e["record"]["history"]) for e in es)
        for e in es:
            e["record"] = {**e["record"], "history": e["record"]["history"][:done]}
    curves_png(entries, steps, t,
               args.out_dir / f"curves_T{t}.png")
    (args.out_dir / "summary.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out_dir / "partial.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
