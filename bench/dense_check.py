"""How informative are SDPO's dense rewards on a task? (an investigation for alignment.py)

SDPO scores x0 at three steps (first, anchor, last) and predicts every other step's reward by
similarity; its loss regresses each pair's log-ratio difference on the pair's ADVANTAGE
DIFFERENCE at every step. This script samples pairs exactly as the trainer does (the
pipeline's base model, ``Rollout.sample_batch``'s inputs, ``Policy.sample_groups``), decodes and scores
x0 at EVERY step (which SDPO never does), and reports per step:

* the mean measured reward of x0_t (is an early x0 scored like the final image?),
* corr(r_t, r_final) over trajectories, and corr of the pair differences
  (r1_t - r2_t) with (r1_final - r2_final): what the per-step target says about the outcome,
* the same for the dense (predicted) reward SDPO actually uses (``predict_dense_rewards``) and
  for its discounted return (what the per-step advantages normalise),
* and the anchor's position histogram.

Run::

    .venv/bin/python bench/dense_check.py                   # digits-tiny base, 256 pairs, ~1 min
    .venv/bin/python bench/dense_check.py --smoke           # tiny-random, 8 pairs, seconds
    .venv/bin/python bench/dense_check.py --set sample.num_steps=8

Writes ``--out`` (default bench/results/dense_check.json) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ROOT, machine_info, setup_logging  # noqa: E402


def corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    return float((a * b).sum() / (a.norm() * b.norm() + 1e-12))


@torch.no_grad()
def measure(tr, pairs: int, batch: int, seed: int) -> dict:
    from sdpo_core.rl.advantages import discounted_returns
    from sdpo_core.rl.dense_rewards import predict_dense_rewards, query_steps, similarities

    gen = torch.Generator().manual_seed(seed)
    prompts_all = tr.train_prompts
    measured, dense, anchors = [], [], []
    for start in range(0, pairs, batch):
        b = min(batch, pairs - start)
        idx = torch.randint(0, len(prompts_all), (b,), generator=gen)
        prompts = [prompts_all[i] for i in idx]
        cond = tr.family.encode(prompts)
        noise = torch.randn((b, *tr.latent_shape), generator=gen)
        tr.acc.unwrap_model(tr.denoiser).eval()
        traj = tr.policy.sample_groups(cond, noise, gen)  # the trainer's own sampling policy
        n, t = traj.x0.shape[:2]
        images = tr.family.decode(traj.x0.flatten(0, 1))
        r_all = tr.reward_fn(images, [p for p in prompts * 2 for _ in range(t)]).float().reshape(n, t)
        anchor, sims = similarities(traj.x0)
        q = query_steps(anchor, t)
        r_q = r_all.gather(1, q)
        measured.append(r_all)
        dense.append(predict_dense_rewards(r_q, sims, anchor, tr.cfg.train.anchor, tr.cfg.train.dense_reward))
        anchors.append(anchor)
    r, d, anchor = torch.cat(measured), torch.cat(dense), torch.cat(anchors)
    # rows are [traj 1 of each batch; traj 2 of each batch] per batch; regroup into pairs
    sizes = [min(batch, pairs - s) for s in range(0, pairs, batch)]
    first = torch.cat([c[:s] for c, s in zip(torch.split(r, [2 * s for s in sizes]), sizes, strict=True)])
    second = torch.cat([c[s:] for c, s in zip(torch.split(r, [2 * s for s in sizes]), sizes, strict=True)])
    d1 = torch.cat([c[:s] for c, s in zip(torch.split(d, [2 * s for s in sizes]), sizes, strict=True)])
    d2 = torch.cat([c[s:] for c, s in zip(torch.split(d, [2 * s for s in sizes]), sizes, strict=True)])
    t = r.shape[1]
    final, final_diff = r[:, -1], first[:, -1] - second[:, -1]
    g1, g2 = discounted_returns(d1, tr.cfg.train.gamma), discounted_returns(d2, tr.cfg.train.gamma)
    rows = []
    for j in range(t):
        rows.append(
            {
                "step": j,
                "timestep": float(tr.timesteps[j]),
                "mean_reward": float(r[:, j].mean()),
                "corr_with_final": corr(r[:, j], final),
                "pair_diff_corr_with_final_diff": corr(first[:, j] - second[:, j], final_diff),
                "dense_pair_diff_corr_with_final_diff": corr(d1[:, j] - d2[:, j], final_diff),
                "return_pair_diff_corr_with_final_diff": corr(g1[:, j] - g2[:, j], final_diff),
                "anchor_share": float((anchor == j).double().mean()),
            }
        )
    return {"pairs": pairs, "steps": t, "rows": rows}


def markdown(result: dict) -> str:
    lines = [
        "| step | t | mean r(x0_t) | corr(r_t, r_final) | corr(pair diff of r_t, final diff) | "
        "same, dense r_t | same, dense return R_t | anchor here |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['step']} | {r['timestep']} | {r['mean_reward']:.3f} | {r['corr_with_final']:+.2f} | "
            f"{r['pair_diff_corr_with_final_diff']:+.2f} | {r['dense_pair_diff_corr_with_final_diff']:+.2f} | "
            f"{r['return_pair_diff_corr_with_final_diff']:+.2f} | {100 * r['anchor_share']:.0f}% |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pipeline", default="digits-tiny")
    ap.add_argument("--pairs", type=int, default=256)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", action="append", default=[], help="config override key=value")
    ap.add_argument("--out", default="bench/results/dense_check.json")
    ap.add_argument("--smoke", action="store_true", help="tiny-random, 8 pairs (CI)")
    args = ap.parse_args(argv)
    setup_logging()
    from sdpo_core.config import load_config
    from sdpo_core.tiny.build import ensure_base
    from sdpo_core.training.trainer import Trainer

    tmp = None
    if args.smoke:
        tmp = tempfile.TemporaryDirectory(prefix="sdpo-dense-")
        args.pipeline, args.pairs, args.batch = "tiny-random", 8, 4
        args.set = [f"model.pretrained={tmp.name}/base", "sample.num_steps=4", *args.set]
    cfg = load_config(args.pipeline, ["tracking.backend=none", *args.set], ROOT / "pipelines.yaml")
    ensure_base(cfg)
    with tempfile.TemporaryDirectory(prefix="sdpo-dense-run-") as run_dir:
        tr = Trainer(cfg, run_dir)
        result = measure(tr, args.pairs, args.batch, args.seed)
        tr.close()
    result.update(
        {
            "pipeline": args.pipeline,
            "overrides": args.set,
            "reward": cfg.reward.name,
            "smoke": args.smoke,
            "machine": machine_info(),
        }
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result))
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
