"""SDPO against DDPO (two configurations) and GRPO when trained as the SDPO paper trains.

The paper trains on long trajectories (T = 50 DDIM steps for SD-Turbo) and evaluates at 1, 2, 4
and 8 steps: its claim is that SDPO's dense rewards carry the reward of the short samples into
training on long ones. Here every method trains on T-step trajectories of the pipeline's base
model (``sample.num_steps=T``, ``train.timestep_fraction`` left at 1) and is evaluated by
``sdpo_core.evaluation.evaluate.evaluate`` (the ``sdpo evaluate`` stage) at ``evaluate.steps``.

Methods (one set of overrides each, on top of the pipeline's defaults and ``--set``):

* ``sdpo``: the pipeline's config (the paper's loss, dense rewards, per-step updates);
* ``ddpo``: ``train.method=ddpo`` with the same hyper-parameters (lr, stat tracker, clip);
* ``ddpo_pytorch``: DDPO with its own published defaults (ddpo-pytorch ``config/base.py``:
  learning rate 3e-4, per-prompt stat tracker buffer 16 / min count 16, PPO clip 1e-4,
  advantage clip 5; our defaults already use that clip and advantage clip);
* ``grpo``: ``train.method=grpo``: groups of ``train.grpo.group_size`` (8) trajectories of one
  prompt, advantages normalised in the group with the batch std (Flow-GRPO's defaults:
  ``global_std`` on, KL ``beta`` 0), PPO clip 1e-4, the pipeline's learning rate (as SDPO and DDPO);
* ``nft``: ``train.method=nft`` (DiffusionNFT, a forward-process method: no log-probs, one query per
  trajectory): groups of ``train.nft.group_size`` (8), the paper's beta 1, old-policy decay schedule and
  KL weight 1e-4, the pipeline's learning rate. The paper evaluates an EMA of its weights (decay 0.9):
  ``--set train.ema_decay=0.9`` gives every method one, or add a method entry with it.

Budgets, both from the same runs:

* **equal trajectories**: every method trains E epochs (64 trajectories per epoch on digits-tiny);
* **equal reward queries**: SDPO scores up to 3 x0 per trajectory (first, anchor, last), the
  others 1, so SDPO's model at epoch ``E // 3`` (a snapshot of the same run) against the others'
  at E; the query counts actually made are printed beside the table.

Reported per T and step count: gain over base with a 95% t-interval over seeds, SDPO - method
(paired by seed) with its interval, the ratio of mean gains; digit accuracy, diversity and
boldness; light-eval curves against trajectories, wall-clock training time and reward queries
(PNG); and time to quality: the training time and queries each method needs before its light-eval
reward (mean over seeds) first reaches the best a DDPO configuration reached in the budget.

Runs are cached and resumable (bench/common.py): stop it at any time and start it again.

    nice -n 10 .venv/bin/python bench/paper_regime.py > bench/results/paper_regime.log 2>&1 &
    .venv/bin/python bench/paper_regime.py --train-steps 16 32 --seeds 0 --epochs 8
    .venv/bin/python bench/paper_regime.py --smoke --out-dir /tmp/paper   # tiny-random, ~1 min
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

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

METHODS: dict[str, list[str]] = {
    "sdpo": ["train.method=sdpo"],
    "ddpo": ["train.method=ddpo"],
    "ddpo_pytorch": [
        "train.method=ddpo",
        "train.learning_rate=3e-4",
        "train.stat_tracking.buffer_size=16",
        "train.stat_tracking.min_count=16",
        "train.clip_range=1e-4",
        "train.adv_clip_max=5",
    ],
    "grpo": ["train.method=grpo", "train.grpo.group_size=8", "train.grpo.std=batch"],
    "nft": ["train.method=nft", "train.nft.group_size=8", "train.nft.std=batch"],
}
MAIN = list(METHODS)
# issue 24: SDPO with a KL to the reference / an EMA, SDPO with fewer queries per trajectory, and one
# tuning budget for every method (3x the learning rate; 2 passes over each epoch's samples)
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "sdpo_kl": ("sdpo", ["train.kl_beta=0.04"]),  # Flow-GRPO's beta
    "sdpo_ema": ("sdpo", ["train.ema_decay=0.9"]),  # DiffusionNFT's EMA decay
    "sdpo_2q": ("sdpo", ["train.anchor=false", "train.skip_unused_queries=true"]),  # first + last
    "sdpo_1q": ("sdpo", ["train.dense_reward=false", "train.skip_unused_queries=true"]),  # last only
    **{f"{m}_lr3": (m, ["train.learning_rate=3e-3"]) for m in ("sdpo", "nft", "grpo", "ddpo")},
    **{f"{m}_inner2": (m, ["train.num_inner_epochs=2"]) for m in ("sdpo", "nft", "grpo", "ddpo")},
}
METHODS.update({k: [*METHODS[base], *extra] for k, (base, extra) in VARIANTS.items()})
LABELS = {"sdpo": "SDPO", "ddpo": "DDPO (shared)", "ddpo_pytorch": "DDPO (ddpo-pytorch defaults)", "grpo": "GRPO",
          "nft": "DiffusionNFT"}
COLOURS = {"sdpo": "tab:blue", "ddpo": "tab:orange", "ddpo_pytorch": "tab:red", "grpo": "tab:green",
           "nft": "tab:purple"}
for _i, (_k, (_base, _extra)) in enumerate(VARIANTS.items()):
    LABELS[_k] = f"{LABELS[_base]} ({', '.join(o.removeprefix('train.') for o in _extra)})"
    COLOURS[_k] = f"C{_i % 10}"
NAMES = {**LABELS, **{f"{m}_eq_queries": f"{LABELS[m]} (equal queries)" for m in METHODS},
         **{f"{m}_eq_time": f"{LABELS[m]} (equal time)" for m in METHODS}}
# reward queries per trajectory: SDPO's first, anchor and last x0; the others' final x0
QUERY_RATIO = 3


def spec(pipeline: str, t: int, method: str, seed: int, epochs: int, extra: list[str]) -> RunSpec:
    """One run; the light evaluation after every epoch gives the curves and the time to quality, and a
    snapshot after every epoch the models at equal reward queries and at equal training time."""
    snapshots = list(range(1, epochs))
    return RunSpec(f"paper-T{t}-{method}-s{seed}", pipeline, [f"sample.num_steps={t}", *METHODS[method], *extra],
                   seed, epochs, 1, snapshots=snapshots)


def _at_epoch(sp: RunSpec, rec: dict, e: int, fresh: bool) -> dict:
    """The entry of run ``rec`` cut at epoch ``e``: its snapshot's evaluation and the history up to it."""
    run_dir = Path(rec["final"]).parent.parent
    model = rec["final"] if e == sp.epochs else rec["snapshots"][str(e)]
    ev = final_eval(sp, model, run_dir / ("eval" if e == sp.epochs else f"eval_epoch_{e}"), fresh=fresh)
    hist = rec["history"][:e]
    return {"record": {**rec, "history": hist, "queries": hist[-1]["queries_cum"],
                       "train_seconds": sum(r["time/epoch"] for r in hist)}, "eval": ev, "epochs": e}


def median_epoch_seconds(rec: dict) -> float:
    """Training seconds per epoch as the run's median (a load spike in one epoch of the shared
    machine would otherwise move its total)."""
    return float(np.median([h["time/epoch"] for h in rec["history"]]))


def run_all(args) -> dict:
    """{T: {label: [per-seed entry]}}; labels: each method at E epochs; ``<m>_eq_queries`` for a method
    making more than one query per trajectory: its snapshot at the last epoch within the one-query
    methods' E x trajectories; ``<m>_eq_time``: every method's snapshot (variants too, each by its own
    median epoch time) at the last epoch within the training time of the fastest main method (epochs x
    median epoch time, mean over seeds)."""
    out: dict[int, dict[str, list[dict]]] = {}
    for t in args.train_steps:
        out[t] = by = {m: [] for m in args.methods}
        specs: dict[str, list[tuple[RunSpec, dict]]] = {m: [] for m in args.methods}
        for seed in args.seeds:
            for method in args.methods:
                sp = spec(args.pipeline, t, method, seed, args.epochs, args.set)
                rec = train_run(sp, fresh=args.fresh, run_root=args.run_root)
                if args.train_only:
                    continue
                by[method].append(_at_epoch(sp, rec, sp.epochs, args.fresh))
                specs[method].append((sp, rec))
                budget = sp.epochs * rec["trajectories_per_epoch"]  # a one-query method's queries
                if rec["queries"] > budget:
                    e = max([1] + [i + 1 for i, h in enumerate(rec["history"]) if h["queries_cum"] <= budget])
                    by.setdefault(f"{method}_eq_queries", []).append(_at_epoch(sp, rec, e, args.fresh))
        main = [m for m in args.methods if m in MAIN]
        if not main or args.train_only:
            continue
        budget_s = min(np.mean([median_epoch_seconds(r) * sp.epochs for sp, r in specs[m]]) for m in main)
        for m in args.methods:
            for sp, rec in specs[m]:
                e = int(np.clip(np.floor(budget_s / median_epoch_seconds(rec) + 1e-6), 1, sp.epochs))
                by.setdefault(f"{m}_eq_time", []).append(_at_epoch(sp, rec, e, args.fresh))
    return out


def _trained(entry: dict, n: int) -> float:
    return entry["eval"]["steps"][str(n)]["trained"]["mean"]


def _base(entry: dict, n: int) -> float:
    return entry["eval"]["steps"][str(n)]["base"]["mean"]


def summarise(runs: dict[str, list[dict]], steps: list[int]) -> dict:
    """Per label: per step count trained / gain (CI over seeds) and metrics; SDPO - label (paired)."""
    s: dict = {}
    for label, entries in runs.items():
        if not entries:
            continue
        per = {}
        for n in steps:
            gains = [_trained(e, n) - _base(e, n) for e in entries]
            metrics = {}
            for m in sorted(entries[0]["eval"]["steps"][str(n)]["trained"].get("metrics", {})):
                metrics[m] = {"base": entries[0]["eval"]["steps"][str(n)]["base"]["metrics"][m],
                              "trained": seed_ci([e["eval"]["steps"][str(n)]["trained"]["metrics"][m]
                                                  for e in entries])}
            per[str(n)] = {"base": _base(entries[0], n), "trained": seed_ci([_trained(e, n) for e in entries]),
                           "gain": seed_ci(gains), "metrics": metrics}
        s[label] = {"epochs": entries[0]["epochs"], "steps": per,
                    "trajectories": entries[0]["epochs"] * entries[0]["record"]["trajectories_per_epoch"],
                    "queries": sum(e["record"]["queries"] for e in entries) / len(entries),
                    "train_minutes": sum(e["record"]["train_seconds"] for e in entries) / len(entries) / 60,
                    "median_epoch_seconds": float(np.median([h["time/epoch"] for e in entries
                                                             for h in e["record"]["history"]]))}
    for budget, _suffix, _title in BUDGETS:
        sdpo = at_budget("sdpo", budget, runs)
        if sdpo is None:
            continue
        for other in MAIN:
            b = at_budget(other, budget, runs) if other != "sdpo" else None
            if b is None:
                continue
            diff, ratio = {}, {}
            for n in steps:
                diff[str(n)] = seed_ci([_trained(x, n) - _trained(y, n)
                                        for x, y in zip(runs[sdpo], runs[b], strict=True)])
                g_other = s[b]["steps"][str(n)]["gain"]["mean"]
                ratio[str(n)] = s[sdpo]["steps"][str(n)]["gain"]["mean"] / g_other if abs(g_other) > 1e-9 else None
            s[f"sdpo_minus_{other}_{budget}"] = {"diff": diff, "gain_ratio": ratio}
    return s


BUDGETS = (("equal_traj", "", "Equal trajectories"), ("equal_queries", "_eq_queries", "Equal reward queries"),
           ("equal_time", "_eq_time", "Equal training time"))


def at_budget(m: str, budget: str, runs: dict) -> str | None:
    """The label of method ``m``'s models at a budget: its E-epoch runs, its equal-query snapshot
    (the E-epoch runs for one-query methods) or its equal-time snapshot; None when absent."""
    label = {"equal_traj": m, "equal_queries": f"{m}_eq_queries", "equal_time": f"{m}_eq_time"}[budget]
    if budget == "equal_queries" and not runs.get(label):
        label = m
    return label if runs.get(label) else None


def _curve(entries: list[dict], n: int):
    """Light-eval reward per seed after each epoch (index 0: before training) and the mean
    cumulative trajectories, training seconds and reward queries at those points."""
    r = np.array([[e["record"]["light_base"][str(n)]] + [h["light"][str(n)] for h in e["record"]["history"]]
                  for e in entries])
    # training time as epochs x the run's median epoch time: the 2-core machine is shared now and
    # then, and a load spike in one epoch would otherwise move the whole curve
    secs = np.array([np.arange(r.shape[1]) * np.median([h["time/epoch"] for h in e["record"]["history"]])
                     for e in entries]).mean(0)
    queries = np.array([[0] + [h["queries_cum"] for h in e["record"]["history"]] for e in entries]).mean(0)
    traj = np.arange(r.shape[1]) * entries[0]["record"]["trajectories_per_epoch"]
    return r, traj, secs, queries


def time_to_quality(runs: dict[str, list[dict]], n: int) -> dict:
    """Target: the best mean light-eval reward a DDPO configuration reached; per method the first
    epoch its mean curve reaches it, with the training time and queries spent by then."""
    ddpos = [m for m in ("ddpo", "ddpo_pytorch") if runs.get(m)]
    if not ddpos:
        return {}
    # the best after training began (index 0 is the base model, which every method "reaches")
    target = max(float(_curve(runs[m], n)[0].mean(0)[1:].max()) for m in ddpos)
    base = float(_curve(runs[ddpos[0]], n)[0].mean(0)[0])
    out = {"target": target, "base": base, "ddpo_gained": target > base, "methods": {}}
    for m in METHODS:
        if not runs.get(m):
            continue
        r, traj, secs, queries = _curve(runs[m], n)
        hit = [i for i, v in enumerate(r.mean(0)) if i > 0 and v >= target - 1e-12]
        out["methods"][m] = ({"epoch": hit[0], "train_minutes": float(secs[hit[0]]) / 60,
                              "queries": float(queries[hit[0]]), "trajectories": int(traj[hit[0]])}
                             if hit else None)
    return out


def curves_png(runs: dict[str, list[dict]], steps: list[int], t: int, path: Path) -> None:
    """Light-eval reward (mean over seeds, band min-max) against trajectories, training minutes and
    reward queries (rows), one column per evaluated step count."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4 * len(steps), 10), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(3, len(steps), squeeze=False)
    for col, n in enumerate(steps):
        for m in METHODS:
            if not runs.get(m):
                continue
            r, traj, secs, queries = _curve(runs[m], n)
            for row, x in enumerate((traj, secs / 60, queries)):
                ax = axes[row][col]
                ax.plot(x, r.mean(0), color=COLOURS[m], label=f"{LABELS[m]} ({len(r)} seeds)")
                ax.fill_between(x, r.min(0), r.max(0), color=COLOURS[m], alpha=0.15, linewidth=0)
        axes[0][col].set_title(f"eval at {n} step{'s' if n > 1 else ''}")
        for row, xl in enumerate(("trajectories sampled", "training minutes (epochs x median epoch time)",
                                  "reward-model queries")):
            axes[row][col].set_xlabel(xl)
            axes[row][col].grid(alpha=0.3)
            if col == 0:
                axes[row][col].set_ylabel("light-eval reward")
        if col == 0:
            axes[0][0].legend(fontsize=8)
    fig.suptitle(f"trained at T = {t}: eval reward during training (band: min-max over seeds)")
    fig.tight_layout()
    fig.savefig(path)


def _acc_div(entry: dict, k: str, which: str = "trained") -> str:
    m = entry["steps"][k]["metrics"]
    vals = [m[x][which] if which == "base" else m[x]["trained"]["mean"] for x in ("digit_accuracy", "diversity")
            if x in m]
    return " / ".join(f"{v:.3f}" for v in vals) or "-"


def _all_models_table(summary: dict, steps: list[int]) -> list[str]:
    """Every model of the run (methods, variants, their equal-query and equal-time snapshots): gain
    over base per step count with its accuracy / diversity."""
    labels = [x for x in summary if x in NAMES]
    lines = ["### Every model: gain over base (digit accuracy / diversity), mean over seeds", "",
             "| model | seeds | epochs | queries | train min | " + " | ".join(f"{n} step{'s' * (n > 1)}" for n in steps)
             + " |", "|---|---:|---:|---:|---:|" + "---:|" * len(steps)]
    for x in labels:
        e = summary[x]
        lines.append(f"| {NAMES[x]} | {e['steps'][str(steps[0])]['gain']['n']} | {e['epochs']} | {e['queries']:.0f} | "
                     f"{e['train_minutes']:.1f} | " + " | ".join(
                         f"{fmt_ci(e['steps'][str(n)]['gain'], sign=True)} ({_acc_div(e, str(n))})" for n in steps)
                     + " |")
    return [*lines, ""]


def markdown_t(t: int, summary: dict, ttq: dict, steps: list[int], seeds: list[int]) -> str:
    lines = [f"## Trained at T = {t} ({len(seeds)} seed{'s' if len(seeds) > 1 else ''}: {seeds})", ""]
    others = [m for m in MAIN if m != "sdpo" and m in summary]
    for budget, _suffix, title in BUDGETS:
        cols = {m: at_budget(m, budget, summary) for m in ("sdpo", *others)}
        if cols["sdpo"] is None:
            continue
        cols = {m: label for m, label in cols.items() if label is not None}
        lines += [f"### {title}: " + ", ".join(
            f"{LABELS[m]} {summary[x]['epochs']} epochs / {summary[x]['queries']:.0f} queries / "
            f"{summary[x]['epochs'] * summary[m]['median_epoch_seconds'] / 60:.1f} min" for m, x in cols.items()), "",
            "Gain over base, mean over seeds [95% t-interval]; digit accuracy / diversity of the trained model "
            "(mean over seeds):", "",
            "| steps | base (acc / div) | " + " | ".join(LABELS[m] for m in cols) + " |",
            "|---:|---:|" + "---:|" * len(cols)]
        for n in steps:
            k = str(n)
            lines.append(f"| {n} | {summary['sdpo']['steps'][k]['base']:.3f} ({_acc_div(summary['sdpo'], k, 'base')}) | "
                         + " | ".join(f"{fmt_ci(summary[x]['steps'][k]['gain'], sign=True)} ({_acc_div(summary[x], k)})"
                                      for x in cols.values()) + " |")
        rest = [m for m in others if m in cols]
        lines += ["", "SDPO - method (trained reward, paired by seed) [95% t-interval]; ratio of mean gains:", "",
                  "| steps | " + " | ".join(f"SDPO - {LABELS[m]} | gain ratio" for m in rest) + " |",
                  "|---:|" + "---:|---:|" * len(rest)]
        for n in steps:
            k = str(n)
            cells = []
            for m in rest:
                d = summary[f"sdpo_minus_{m}_{budget}"]
                r = d["gain_ratio"][k]
                cells += [fmt_ci(d["diff"][k], sign=True), "-" if r is None else f"{r:.2f}"]
            lines.append(f"| {n} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += _all_models_table(summary, steps)
    if ttq:
        lines += ["### Time to quality (light eval, mean over seeds)", "",
                  "| eval steps | target (best DDPO) | " + " | ".join(LABELS[m] for m in METHODS if m in summary)
                  + " |", "|---:|---:|" + "---|" * sum(m in summary for m in METHODS)]
        for n, q in ttq.items():
            cells = []
            for m in METHODS:
                if m not in summary:
                    continue
                h = q["methods"].get(m)
                cells.append("not reached" if h is None else
                             f"epoch {h['epoch']}, {h['train_minutes']:.1f} min, {h['queries']:.0f} queries")
            gained = "" if q["ddpo_gained"] else " (no DDPO gain over base)"
            lines.append(f"| {n} | {q['target']:.3f}{gained} | " + " | ".join(cells) + " |")
        lines.append("")
    minutes = ", ".join(f"{LABELS[m]} {summary[m]['train_minutes']:.1f} min ({summary[m]['median_epoch_seconds']:.1f} s "
                        "median epoch)" for m in METHODS if m in summary)
    lines += [f"Training time per run (mean over seeds; light evaluation excluded): {minutes}.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pipeline", default="digits-tiny-paper")
    ap.add_argument("--train-steps", type=int, nargs="+", default=[50], help="training trajectory lengths T")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=12, help="epochs of every method (SDPO's equal-query model: E // 3)")
    ap.add_argument("--methods", nargs="+", choices=list(METHODS), default=MAIN,
                    help=f"default: {' '.join(MAIN)}; variants: {' '.join(VARIANTS)}")
    ap.add_argument("--set", action="append", default=[], help="config override for every method, key=value")
    ap.add_argument("--out-dir", type=Path, default=Path("bench/results/paper_regime"))
    ap.add_argument("--run-root", type=Path, default=RUN_ROOT)
    ap.add_argument("--fresh", action="store_true", help="retrain even if a cached run exists")
    ap.add_argument("--train-only", action="store_true",
                    help="train (or resume) the runs and stop: several processes can split the methods, and a "
                    "later call without it evaluates and reports from the cache")
    ap.add_argument("--smoke", action="store_true", help="tiny-random, T=3, 2 seeds, 3 epochs (CI)")
    args = ap.parse_args(argv)
    if args.epochs < QUERY_RATIO:
        ap.error(f"--epochs must be >= {QUERY_RATIO}: SDPO's equal-query model is its snapshot at epoch E // {QUERY_RATIO}")
    if args.smoke:
        import tempfile

        args.pipeline, args.seeds, args.epochs, args.train_steps = "tiny-random", [0, 1], 3, [3]
        args.run_root = Path(tempfile.mkdtemp(prefix="sdpo-bench-"))
        args.set = [f"model.pretrained={args.run_root / 'base'}", "evaluate.num_prompts=2", "sample.batch_size=4",
                    "train.batch_size=4", "train.grpo.group_size=4", "train.nft.group_size=4", *args.set]
    setup_logging()
    freeze_pipelines(args.out_dir)
    runs = run_all(args)
    if args.train_only:
        return 0
    first = next(iter(runs.values()))[args.methods[0]][0]
    steps = sorted(int(k) for k in first["eval"]["steps"])
    result: dict = {"meta": {"pipeline": args.pipeline, "seeds": args.seeds, "epochs": args.epochs,
                             "train_steps": args.train_steps, "methods": {m: METHODS[m] for m in args.methods},
                             "overrides": args.set, "smoke": args.smoke, "argv": sys.argv[1:],
                             "machine": machine_info()}, "by_T": {}}
    text = [f"pipeline `{args.pipeline}`, overrides {' '.join(f'`{o}`' for o in args.set) or 'none'}; "
            f"{args.epochs} epochs per method; command `python bench/paper_regime.py {' '.join(sys.argv[1:])}`", ""]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for t, by_label in runs.items():
        summary = summarise(by_label, steps)
        ttq = {str(n): time_to_quality(by_label, n) for n in steps if n in (1, 2)}
        ttq = {k: v for k, v in ttq.items() if v}
        curves_png(by_label, steps, t, args.out_dir / f"curves_T{t}.png")
        result["by_T"][str(t)] = {
            "summary": summary, "time_to_quality": ttq,
            "runs": {label: [{"seed": e["record"]["seed"], "epochs": e["epochs"], "queries": e["record"]["queries"],
                              "train_seconds": e["record"]["train_seconds"], "light_base": e["record"]["light_base"],
                              "history": e["record"]["history"],
                              "eval": {k: {m: v[m]["mean"] for m in ("base", "trained")} | {"gain": v["gain"]}
                                       for k, v in e["eval"]["steps"].items()}}
                             for e in entries] for label, entries in by_label.items()}}
        text.append(markdown_t(t, summary, ttq, steps, args.seeds))
    (args.out_dir / "summary.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out_dir / "paper_regime.md").write_text("\n".join(text) + "\n")
    print("\n".join(text))
    if args.smoke:
        import shutil

        shutil.rmtree(args.run_root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
