"""Promotion rules: does a newly registered model beat the current champion?

Pure functions over ``eval.json`` dicts (schema: docs/eval_schema.md), so the rule is tested
without MLflow; ``sdpo_core.tracking.registry`` applies the decision to the registry.

For each step count ``n`` of the new evaluation, with ``m(n)`` a model's mean reward there and
``h(n)`` the half-width of its 95% interval (``(ci95[1] - ci95[0]) / 2``):

* ``all_steps_ci``: promote iff, at every ``n``, ``m_new(n) - m_champ(n) > sqrt(h_new(n)^2 +
  h_champ(n)^2)``: the lower end of the 95% interval of the difference of the two (independent)
  means is above 0.
* ``all_steps_mean``: promote iff ``m_new(n) > m_champ(n)`` at every ``n``.
* ``mean_over_steps``: promote iff the mean of ``m_new`` over the step counts is larger than the
  champion's over the same step counts.

No champion yet (or one whose numbers cannot be read): the base model is the incumbent. The new
model becomes champion only if it beats the base (``steps.<n>.base`` of its own ``eval.json``)
under the same rule, else challenger; without base numbers it stays challenger. Models
scored with another reward, or a champion not evaluated at one of the new step counts, are not
comparable: the new model becomes challenger. An evaluation that is missing or invalid raises
:class:`PromotionError`; nothing is registered then.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RULES = ("all_steps_ci", "all_steps_mean", "mean_over_steps")
CHAMPION, CHALLENGER = "champion", "challenger"
TAG_PREFIX = "eval."


class PromotionError(ValueError):
    """The evaluation cannot back a registration (missing, unreadable, or without a trained model)."""


@dataclass(frozen=True)
class StepScore:
    mean: float
    half_width: float


@dataclass(frozen=True)
class Decision:
    alias: str  # CHAMPION or CHALLENGER
    reason: str
    margins: dict[int, float] = field(default_factory=dict)  # n -> m_new - m_champ


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise PromotionError(f"eval.json: {where} must be a finite number, got {value!r}")
    return float(value)


def trained_scores(eval_dict: dict) -> dict[int, StepScore]:
    """The trained model's mean and CI half-width per step count; PromotionError if malformed."""
    steps = eval_dict.get("steps") if isinstance(eval_dict, dict) else None
    if not isinstance(steps, dict) or not steps:
        raise PromotionError("eval.json: 'steps' is missing or empty")
    scores = {}
    for key, entry in steps.items():
        trained = entry.get("trained") if isinstance(entry, dict) else None
        if not isinstance(trained, dict):
            raise PromotionError(
                f"eval.json: steps.{key} has no trained model (was a trained model evaluated?)"
            )
        ci = trained.get("ci95")
        if not isinstance(ci, list) or len(ci) != 2:
            raise PromotionError(f"eval.json: steps.{key}.trained.ci95 must be [lo, hi], got {ci!r}")
        lo, hi = (_number(v, f"steps.{key}.trained.ci95") for v in ci)
        mean = _number(trained.get("mean"), f"steps.{key}.trained.mean")
        if not lo <= mean <= hi:
            raise PromotionError(
                f"eval.json: steps.{key}: mean {mean} lies outside its interval [{lo}, {hi}]"
            )
        if not str(key).isdigit():
            raise PromotionError(f"eval.json: step key {key!r} is not a step count")
        scores[int(key)] = StepScore(mean, (hi - lo) / 2)
    return scores


def load_eval(path: str | Path) -> dict:
    """Read and check ``eval.json``: it must parse and hold a trained model's scores."""
    path = Path(path)
    if not path.is_file():
        raise PromotionError(f"no evaluation at {path}: run `sdpo evaluate` first (nothing was registered)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise PromotionError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("reward"), str):
        raise PromotionError(f"{path}: expected an object with 'reward' and 'steps' (docs/eval_schema.md)")
    trained_scores(data)
    return data


def eval_tags(eval_dict: dict) -> dict[str, str]:
    """Registry tags carrying the numbers the rule reads back (floats as repr: exact round trip)."""
    tags = {
        f"{TAG_PREFIX}reward": eval_dict["reward"],
        f"{TAG_PREFIX}pipeline": str(eval_dict.get("pipeline")),
    }
    for key, entry in eval_dict["steps"].items():
        t = entry["trained"]
        tags[f"{TAG_PREFIX}{key}.trained_mean"] = repr(float(t["mean"]))
        tags[f"{TAG_PREFIX}{key}.trained_ci95"] = f"{float(t['ci95'][0])!r},{float(t['ci95'][1])!r}"
        if "base" in entry:
            tags[f"{TAG_PREFIX}{key}.base_mean"] = repr(float(entry["base"]["mean"]))
        for name in ("gain", "win_rate"):
            if name in entry:
                tags[f"{TAG_PREFIX}{key}.{name}"] = repr(float(entry[name]))
    tags[f"{TAG_PREFIX}steps"] = ",".join(sorted(eval_dict["steps"], key=int))
    return tags


def eval_from_tags(tags: dict[str, str]) -> dict | None:
    """The minimal eval dict (reward, trained mean/ci95 per step) back from tags; None if absent."""
    try:
        steps = {
            key: {
                "trained": {
                    "mean": float(tags[f"{TAG_PREFIX}{key}.trained_mean"]),
                    "ci95": [float(v) for v in tags[f"{TAG_PREFIX}{key}.trained_ci95"].split(",")],
                }
            }
            for key in tags[f"{TAG_PREFIX}steps"].split(",")
        }
        result = {"reward": tags[f"{TAG_PREFIX}reward"], "steps": steps}
        trained_scores(result)
    except (KeyError, ValueError):
        return None
    return result


def base_eval(eval_dict: dict) -> dict | None:
    """The base model's numbers of ``eval_dict`` as an eval dict of their own (the incumbent of a
    first version); None when some step count has no readable base numbers."""
    steps = {}
    for key, entry in eval_dict["steps"].items():
        base = entry.get("base") if isinstance(entry, dict) else None
        if not isinstance(base, dict):
            return None
        steps[key] = {"trained": base}
    result = {"reward": eval_dict.get("reward"), "steps": steps}
    try:
        trained_scores(result)
    except PromotionError:
        return None
    return result


def _compare(rule: str, new: dict[int, StepScore], inc: dict[int, StepScore]) -> tuple[bool, str, dict]:
    """(does ``new`` beat the incumbent ``inc`` under ``rule``, a detail line, margins per step)."""
    margins = {n: new[n].mean - inc[n].mean for n in sorted(new)}
    if rule == "all_steps_ci":
        needed = {n: math.hypot(new[n].half_width, inc[n].half_width) for n in margins}
        wins = all(margins[n] > needed[n] for n in margins)
        detail = ", ".join(f"{n} steps: {margins[n]:+.4g} vs CI {needed[n]:.4g}" for n in margins)
    elif rule == "all_steps_mean":
        wins = all(m > 0 for m in margins.values())
        detail = ", ".join(f"{n} steps: {margins[n]:+.4g}" for n in margins)
    else:
        avg = sum(margins.values()) / len(margins)
        wins = avg > 0
        detail = f"mean over steps {avg:+.4g}"
    return wins, detail, margins


def decide(rule: str, new: dict, champion: dict | None) -> Decision:
    """Alias for the new model under ``rule`` (see the module docstring) given the champion's eval
    (None: no champion yet, the base model of ``new`` is the incumbent)."""
    if rule not in RULES:
        raise PromotionError(f"unknown register.rule {rule!r}; expected one of {', '.join(RULES)}")
    new_scores = trained_scores(new)
    if champion is None:
        base = base_eval(new)
        if base is None:
            return Decision(CHALLENGER, "no current champion, and eval.json has no base numbers to beat")
        wins, detail, margins = _compare(rule, new_scores, trained_scores(base))
        verdict = "beats" if wins else "does not beat"
        return Decision(
            CHAMPION if wins else CHALLENGER,
            f"{rule}: no current champion; {verdict} the base model ({detail})",
            margins,
        )
    if champion.get("reward") != new.get("reward"):
        return Decision(
            CHALLENGER,
            f"not comparable: champion scored with {champion.get('reward')!r}, new with {new['reward']!r}",
        )
    champ_scores = trained_scores(champion)
    missing = sorted(set(new_scores) - set(champ_scores))
    if missing:
        return Decision(CHALLENGER, f"not comparable: champion was not evaluated at step count(s) {missing}")
    wins, detail, margins = _compare(rule, new_scores, champ_scores)
    verdict = "beats" if wins else "does not beat"
    return Decision(CHAMPION if wins else CHALLENGER, f"{rule}: {verdict} the champion ({detail})", margins)
