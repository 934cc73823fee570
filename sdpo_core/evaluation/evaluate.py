"""Multi-step evaluation: base vs trained model on the eval prompts at several step counts.

Every sample has a fixed seed (``evaluate.seed`` + its index), so the base and the trained model
start from the same noise and are compared pair by pair. The registered champion, when given
(:class:`Champion`), is evaluated the same way beside them, so the promotion rule compares the new
model with it sample by sample on this evaluation's prompts and settings. Writes ``eval.json`` (schema in
``docs/eval_schema.md``), ``reward_vs_steps.png`` and ``grid.png``.

Usage::

    result = evaluate(cfg, cfg.model.pretrained, "runs/x/final", eval_prompts, "runs/x/eval")
    print(format_table(result))
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from sdpo_core.config import Config, ConfigError
from sdpo_core.evaluation.metrics import MetricFn, get_metric
from sdpo_core.evaluation.plots import reward_vs_steps_plot, save_image_grid
from sdpo_core.families import loading
from sdpo_core.generate import compute_dtype, default_device, generate
from sdpo_core.rewards import RewardFn, build_reward, check_rewards
from sdpo_core.rundir import ranks
from sdpo_core.rundir.atomic import atomic_write_text

log = logging.getLogger(__name__)
SCHEMA_VERSION = 1
GRID_PROMPTS = 8
FILES = ("eval.json", "reward_vs_steps.png", "grid.png")


class EvaluateError(ConfigError):
    """Evaluation cannot run as configured; the message says what to change (a ConfigError, so the
    CLI reports it as bad input)."""


# ---------------------------------------------------------------------------------------------
# Statistics


def _t_quantile(level: float, dof: int) -> float:
    """Two-sided Student-t quantile (scipy comes with scikit-learn)."""
    from scipy import stats

    return float(stats.t.ppf((1 + level) / 2, dof))


def mean_ci(values: torch.Tensor, level: float = 0.95) -> tuple[float, float, float]:
    """Mean of (N,) values and its t-interval: mean +- t_{(1+level)/2, N-1} * s / sqrt(N).

    ``s`` is the sample standard deviation (N - 1 in the denominator). Needs N >= 2.
    Returns (mean, lo, hi).
    """
    x = values.detach().double().flatten().cpu()
    n = x.numel()
    if n < 2:
        raise EvaluateError(f"a confidence interval needs at least 2 values, got {n}")
    mean = float(x.mean())
    half = _t_quantile(level, n - 1) * float(x.std(unbiased=True)) / math.sqrt(n)
    return mean, mean - half, mean + half


def paired_stats(base: torch.Tensor, trained: torch.Tensor, level: float = 0.95) -> dict[str, Any]:
    """Paired comparison of (N,) rewards of the same seeds and prompts.

    gain = mean(trained - base) with the t-interval of that mean; win_rate = share of pairs
    where trained > base, ties counting half.
    """
    if base.shape != trained.shape or base.dim() != 1:
        raise EvaluateError(
            f"paired rewards must be two (N,) tensors, got {tuple(base.shape)} and {tuple(trained.shape)}"
        )
    diff = trained.double() - base.double()
    gain, lo, hi = mean_ci(diff, level)
    wins = (diff > 0).double() + 0.5 * (diff == 0).double()
    return {"gain": gain, "gain_ci95": [lo, hi], "win_rate": float(wins.mean())}


def summarize(rewards: torch.Tensor, metrics: dict[str, float]) -> dict[str, Any]:
    """One model at one step count: (N,) rewards -> {mean, ci95, n, std, metrics, rewards}."""
    mean, lo, hi = mean_ci(rewards)
    return {
        "mean": mean,
        "ci95": [lo, hi],
        "n": int(rewards.numel()),
        "std": float(rewards.double().std()),
        "metrics": metrics,
        "rewards": [float(r) for r in rewards],
    }


# ---------------------------------------------------------------------------------------------
# Generation and scoring


@dataclass(frozen=True)
class Champion:
    """The registered model the new one must beat: ``name`` version ``version``, its trained
    weights (a ``final``-like directory) at ``trained_dir``."""

    name: str
    version: str
    trained_dir: Path


@dataclass(frozen=True)
class EvalPlan:
    """The N = P * S samples: sample i is prompt ``prompts[i // S]`` with seed ``seeds[i]``."""

    prompts: list[str]  # P prompts (eval prompts cycled to num_prompts)
    sample_prompts: list[str]  # N
    groups: torch.Tensor  # (N,) long: index of the sample's prompt among the unique eval prompts
    seeds: list[int]  # N
    grid_samples: list[int]  # first sample of each of the first <= GRID_PROMPTS prompts


def eval_plan(cfg: Config, eval_prompts: list[str]) -> EvalPlan:
    ev = cfg.evaluate
    if not eval_prompts:
        raise EvaluateError(
            "no eval prompts: prompts.eval_fraction is 0 or the eval split is empty; "
            "set prompts.eval_fraction > 0 (e.g. --set prompts.eval_fraction=0.2) to hold out prompts"
        )
    if ev.num_prompts * ev.samples_per_prompt < 2:
        raise EvaluateError(
            "evaluate.num_prompts x evaluate.samples_per_prompt must be >= 2 for a confidence interval"
        )
    prompts = [eval_prompts[i % len(eval_prompts)] for i in range(ev.num_prompts)]
    s = ev.samples_per_prompt
    n = len(prompts) * s
    return EvalPlan(
        prompts=prompts,
        sample_prompts=[prompts[i // s] for i in range(n)],
        groups=torch.tensor([(i // s) % len(eval_prompts) for i in range(n)], dtype=torch.long),
        seeds=[ev.seed + i for i in range(n)],
        grid_samples=[p * s for p in range(min(GRID_PROMPTS, len(prompts), len(eval_prompts)))],
    )


def evaluate_model(
    family, label: str, plan: EvalPlan, cfg: Config, reward_fn: RewardFn, metric_fns: dict[str, MetricFn],
    dtype: torch.dtype = torch.float32,
) -> tuple[dict[int, dict[str, Any]], torch.Tensor]:
    """Score one model at every step count, sampled with the training policy (``generate``): the
    reward and the metrics ``metric_fns``, by name.

    Under ``torchrun`` / ``accelerate launch`` the ranks share the work and gather it: batch j (of
    ``evaluate.batch_size`` samples) is sampled and scored on rank j mod R, exactly as one process
    samples it (same samples, seeds and batch), and every rank gets every batch back in order; so the
    result is one process's, bit for bit, in about 1/R of its time (tests/e2e/test_launchers.py).

    Returns ({steps: summary}, grid images (len(steps), K, 3, H, W) uint8 for K grid prompts).
    """
    steps, bs, n = cfg.evaluate.steps, cfg.evaluate.batch_size, len(plan.sample_prompts)
    starts = list(range(0, n, bs))
    mine = starts[ranks.rank() :: ranks.world_size()]
    log.debug("rank %d: eval %s samples the batches starting at %s of %d", ranks.rank(), label, mine, n)
    results, grid_rows = {}, []
    bar = tqdm(total=len(steps) * len(mine), desc=f"eval {label}", unit="batch", disable=not ranks.is_local_main_process())
    for num_steps in steps:
        done = {}  # batch start -> (rewards (b,), images (b, 3, H, W) if metrics else (0,), grid uint8)
        for start in mine:
            prompts, seeds = plan.sample_prompts[start : start + bs], plan.seeds[start : start + bs]
            images = generate(family, prompts, seeds, num_steps, cfg, dtype)
            rewards = check_rewards(cfg.reward.name, reward_fn(images, prompts), len(prompts)).cpu()
            in_grid = [i - start for i in plan.grid_samples if start <= i < start + bs]
            grid = (images[in_grid].clamp(0, 1) * 255).round().to(torch.uint8).cpu()
            done[start] = (rewards, images.cpu() if metric_fns else torch.empty(0), grid)  # metrics: all N at once
            bar.update()
        every = {start: batch for part in ranks.gather(done) for start, batch in part.items()}
        batches = [every[start] for start in starts]
        metrics = {
            m: float(metric_fns[m](torch.cat([b[1] for b in batches]), plan.sample_prompts, plan.groups))
            for m in metric_fns
        }
        results[num_steps] = summarize(torch.cat([b[0] for b in batches]), metrics)
        grid_rows += [b[2] for b in batches]
        log.info("%s, %d step(s): mean reward %.4f", label, num_steps, results[num_steps]["mean"])
    bar.close()
    grid = torch.cat(grid_rows).reshape(len(steps), len(plan.grid_samples), *grid_rows[0].shape[1:])
    return results, grid


# ---------------------------------------------------------------------------------------------
# The stage


def _load(cfg: Config, base: str, trained_dir: str | Path | None, device: torch.device, dtype: torch.dtype):
    """The base model's family as is (``trained_dir`` None), or with the trained weights applied;
    every module, the denoiser too, in ``dtype`` (training's compute dtype)."""
    m, res = cfg.model, cfg.sample.resolution
    if trained_dir is None:
        return loading.load_family(base, m.revision, device, dtype, m.family, m.family_options, res, m.base_lora,
                                   m.base_lora_scale, dtype)
    meta_base = loading.read_model_meta(trained_dir)["base_model"]
    if meta_base != base and Path(meta_base).resolve() != Path(base).resolve():
        log.warning("trained model %s was trained on %s but is evaluated on %s", trained_dir, meta_base, base)
    return loading.load_trained(trained_dir, base=base, device=device, dtype=dtype, revision=m.revision,
                                options=m.family_options, resolution=res)


def build_eval_dict(
    cfg: Config, base: str, trained_dir: str | Path | None, plan: EvalPlan, results: dict,
    champion: Champion | None = None,
) -> dict:
    """Assemble ``eval.json`` (schema: docs/eval_schema.md) from per-model, per-step summaries."""
    steps: dict[str, dict[str, Any]] = {}
    for n in cfg.evaluate.steps:
        entry = {label: results[label][n] for label in results}
        if "trained" in results:
            b, t = (torch.tensor(results[label][n]["rewards"]) for label in ("base", "trained"))
            entry.update(paired_stats(b, t))
        if "champion" in results and "trained" in results:
            c, t = (torch.tensor(results[label][n]["rewards"]) for label in ("champion", "trained"))
            entry["vs_champion"] = paired_stats(c, t)
        steps[str(n)] = entry
    extra = {} if champion is None else {
        "champion": {"name": champion.name, "version": champion.version,
                     "model_uri": f"models:/{champion.name}/{champion.version}"}
    }
    return {
        "schema_version": SCHEMA_VERSION,
        "pipeline": cfg.pipeline,
        "reward": cfg.reward.name,
        "base_model": base,
        "trained_model": None if trained_dir is None else str(trained_dir),
        "num_prompts": cfg.evaluate.num_prompts,
        "samples_per_prompt": cfg.evaluate.samples_per_prompt,
        "seed": cfg.evaluate.seed,
        "eta": cfg.sample.eta,
        "last_step": cfg.sample.last_step,
        "mixed_precision": cfg.model.mixed_precision,
        "guidance_scale": cfg.sample.guidance_scale,
        "prompts": plan.prompts,
        "steps": steps,
        **extra,
    }


def evaluate(
    cfg: Config,
    base: str,
    trained_dir: str | Path | None,
    eval_prompts: list[str],
    out_dir: str | Path,
    device: str | torch.device | None = None,
    tracker=None,
    champion: Champion | None = None,
) -> dict:
    """Evaluate base (and trained, unless ``trained_dir`` is None; and ``champion`` when given) at
    each of ``evaluate.steps``, on the same samples.

    Writes ``eval.json``, ``reward_vs_steps.png`` and ``grid.png`` into ``out_dir``; logs per-step
    means and the files to ``tracker`` when given. Samples on ``device`` (default: where training
    runs, a GPU if there is one) in training's compute dtype (``model.mixed_precision``), with the
    training sampler. Returns the eval dict. Under a launcher every rank calls it: they share the
    sampling (``evaluate_model``) and all return the result; rank 0 alone writes and tracks.
    """
    # 1. Check everything cheap before loading a model.
    plan = eval_plan(cfg, eval_prompts)
    device = torch.device(device) if device is not None else default_device()
    dtype = compute_dtype(cfg.model.mixed_precision)
    # rewards and metrics that ship with the base model (the digits classifier) find it in `base`
    reward_fn = build_reward(cfg.reward.name, cfg.reward.options, device=device, dtype=dtype, model_dir=str(base))
    metric_fns = {name: get_metric(name, model_dir=str(base)) for name in cfg.evaluate.metrics}
    # 2. One model at a time (the base is freed before the trained one loads).
    results, grids = {}, {}
    models_to_run = {"base": None} if trained_dir is None else {"base": None, "trained": trained_dir}
    if champion is not None:
        models_to_run["champion"] = champion.trained_dir
    for label, weights in models_to_run.items():
        family = _load(cfg, base, weights, device, dtype)
        results[label], grids[label] = evaluate_model(family, label, plan, cfg, reward_fn, metric_fns, dtype)
        del family
    # 3. Statistics (the same on every rank), files and tracking (rank 0: the one writer).
    result = build_eval_dict(cfg, base, trained_dir, plan, results, champion)
    if ranks.is_main_process():
        write_outputs(cfg, plan, result, grids, Path(out_dir), tracker)
    return result


def write_outputs(cfg: Config, plan: EvalPlan, result: dict, grids: dict, out: Path, tracker=None) -> None:
    """eval.json, reward_vs_steps.png and grid.png into ``out``; the means and files to ``tracker``."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "eval.json", json.dumps(result, indent=2) + "\n")  # temp sibling, fsync, rename
    reward_vs_steps_plot(result, out / "reward_vs_steps.png")
    rows = [f"{n} step{'s' if n > 1 else ''}" for n in cfg.evaluate.steps]
    columns = [plan.prompts[i // cfg.evaluate.samples_per_prompt] for i in plan.grid_samples]
    save_image_grid(grids, rows, columns, out / "grid.png")
    if tracker is not None:
        log_to_tracker(tracker, result, [out / f for f in FILES])
    log.info("evaluation written to %s", out)


def log_to_tracker(tracker, result: dict, paths: list[Path]) -> None:
    """Per step count (as the metric step): each model's mean, and gain / win rate when paired."""
    for key, entry in result["steps"].items():
        metrics = {}
        for label in ("base", "trained", "champion"):
            if label in entry:
                metrics[f"eval/{label}_mean"] = entry[label]["mean"]
                metrics.update({f"eval/{label}_{m}": v for m, v in entry[label]["metrics"].items()})
        if "gain" in entry:
            metrics.update({"eval/gain": entry["gain"], "eval/win_rate": entry["win_rate"]})
        if "vs_champion" in entry:
            metrics["eval/gain_vs_champion"] = entry["vs_champion"]["gain"]
        tracker.log_metrics(metrics, step=int(key))
    for path in paths:
        tracker.log_artifact(path)


def format_table(eval_dict: dict) -> str:
    """Plain-text table: steps | base mean +- CI | trained mean +- CI | gain [CI] | win rate."""

    def pm(entry: dict | None) -> str:
        if entry is None:
            return "-"
        return f"{entry['mean']:.4f} ± {(entry['ci95'][1] - entry['ci95'][0]) / 2:.4f}"

    header = ["steps", "base mean ± CI95", "trained mean ± CI95", "gain [CI95]", "win rate"]
    rows = [header]
    for key in sorted(eval_dict["steps"], key=int):
        e = eval_dict["steps"][key]
        gain = (
            f"{e['gain']:+.4f} [{e['gain_ci95'][0]:+.4f}, {e['gain_ci95'][1]:+.4f}]" if "gain" in e else "-"
        )
        win = f"{e['win_rate']:.2f}" if "win_rate" in e else "-"
        rows.append([key, pm(e.get("base")), pm(e.get("trained")), gain, win])
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = [" | ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    title = f"{eval_dict['pipeline']}: {eval_dict['reward']}"
    champ = eval_dict.get("champion")
    versus = [] if not champ else [f"vs {champ['name']} version {champ['version']} (same samples): " + ", ".join(
        f"{k} steps {e['vs_champion']['gain']:+.4f} [{e['vs_champion']['gain_ci95'][0]:+.4f}, "
        f"{e['vs_champion']['gain_ci95'][1]:+.4f}]"
        for k, e in sorted(eval_dict["steps"].items(), key=lambda kv: int(kv[0])) if "vs_champion" in e)]
    return "\n".join([title, *lines, *versus])
