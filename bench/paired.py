"""Paired differences between any two models of a ``paper_regime.py`` result, per evaluation step count.

``paper_regime.py`` prints SDPO - method for the main methods; a variant (``sdpo_1q``, ``sdpo_kl``, ...)
gets only its own gain. This reads the result's ``summary.json`` and prints, for model A against each
model B, the difference of their trained rewards paired by seed with its 95% t-interval over seeds
(the base model is the same for every run of a seed, so this is also the difference of gains):

    .venv/bin/python bench/paired.py bench/results/issue24/paper_T50/summary.json sdpo_1q nft grpo ddpo
    .venv/bin/python bench/paired.py RESULT.json sdpo_1q sdpo_eq_queries --json out.json

Labels are the result's run labels (``sdpo``, ``nft``, ``sdpo_eq_queries``, ``grpo_eq_time``, ...).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import fmt_ci, seed_ci  # noqa: E402


def paired(runs: dict[str, list[dict]], a: str, b: str) -> dict[str, dict]:
    """{step count: seed_ci of gain(a) - gain(b)} over the seeds both labels ran."""
    by_seed = {label: {e["seed"]: e["eval"] for e in runs[label]} for label in (a, b)}
    seeds = sorted(set(by_seed[a]) & set(by_seed[b]))
    if not seeds:
        raise SystemExit(f"{a!r} and {b!r} share no seed")
    steps = sorted(by_seed[a][seeds[0]], key=int)
    return {n: seed_ci([by_seed[a][s][n]["gain"] - by_seed[b][s][n]["gain"] for s in seeds]) for n in steps}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("summary", type=Path, help="a paper_regime.py summary.json")
    ap.add_argument("a", help="the model compared")
    ap.add_argument("b", nargs="+", help="the models it is compared with")
    ap.add_argument("--train-steps", help="which T of the result (default: its first)")
    ap.add_argument("--json", type=Path, help="also write the differences here")
    args = ap.parse_args(argv)
    result = json.loads(args.summary.read_text())
    t = args.train_steps or next(iter(result["by_T"]))
    runs = result["by_T"][t]["runs"]
    missing = [label for label in (args.a, *args.b) if label not in runs]
    if missing:
        ap.error(f"{args.summary} has no runs labelled {', '.join(missing)} (it has: {', '.join(runs)})")
    table = {b: paired(runs, args.a, b) for b in args.b}
    steps = list(next(iter(table.values())))
    print(f"{args.a} - model, trained reward paired by seed [95% t-interval], T = {t}\n")
    print("| steps | " + " | ".join(f"{args.a} - {b}" for b in args.b) + " |")
    print("|---:|" + "---:|" * len(args.b))
    for n in steps:
        print(f"| {n} | " + " | ".join(fmt_ci(table[b][n], sign=True) for b in args.b) + " |")
    if args.json:
        args.json.write_text(json.dumps({"a": args.a, "T": t, "diff": table}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
