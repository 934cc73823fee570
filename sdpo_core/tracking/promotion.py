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

Against a champion the comparison is paired whenever it can be: the champion re-evaluated in the
same evaluation (``steps.<n>.champion`` of the new ``eval.json``, same prompts, seeds and settings by
construction), or else the champion's own stored per-sample rewards when every field of
:data:`EVAL_SET_FIELDS` matches exactly. ``m(n)`` is then the mean over samples of ``new - champion``
and ``h(n)`` the half-width of its 95% t-interval; ``all_steps_ci`` promotes iff ``m(n) > h(n)`` at
every ``n`` (the lower end of the paired interval is above 0), the other rules read ``m(n)`` as the
margin. Records whose :data:`EVAL_SET_FIELDS` differ are never compared: the new model becomes
challenger with a reason that names the field. A champion without per-sample rewards (registered
before they were kept) but with matching fields is compared unpaired, as above.

No champion yet (or one whose numbers cannot be read): the base model is the incumbent. The new
model becomes champion only if it beats the base (``steps.<n>.base`` of its own ``eval.json``)
under the same rule, else challenger; without base numbers it stays challenger. Models
scored with another reward, or a champion not evaluated at one of the new step counts, are not
comparable: the new model becomes challenger. An evaluation that is missing or invalid raises
:class:`PromotionError`; nothing is registered then.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scipy import stats

RULES = ("all_steps_ci", "all_steps_mean", "mean_over_steps")
CHAMPION, CHALLENGER = "champion", "challenger"
TAG_PREFIX = "eval."
SET_HASH_TAG = "eval.set_hash"
# what changes the numbers of an evaluation besides the model: two records that differ in one of
# these measured different things (the step counts are checked one by one)
EVAL_SET_FIELDS = ("reward", "prompts", "num_prompts", "samples_per_prompt", "seed", "eta", "last_step",
                   "guidance_scale", "mixed_precision")


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


def eval_set_hash(eval_dict: dict) -> str:
    """sha256 (first 32 hex digits) of the :data:`EVAL_SET_FIELDS` of ``eval_dict`` (absent: null)."""
    fields = {k: eval_dict.get(k) for k in EVAL_SET_FIELDS}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:32]


def eval_set_mismatch(new: dict, champion: dict) -> str | None:
    """The first of :data:`EVAL_SET_FIELDS` whose values differ, as a reason; None when all match."""
    for key in EVAL_SET_FIELDS:
        if new.get(key) != champion.get(key):
            a, b = champion.get(key), new.get(key)
            shown = "" if key == "prompts" else f" (champion {a!r}, new {b!r})"
            return f"not comparable: the evaluations' {key} differ{shown}"
    return None


def eval_tags(eval_dict: dict) -> dict[str, str]:
    """Registry tags carrying the numbers the rule reads back (floats as repr: exact round trip)."""
    tags = {
        f"{TAG_PREFIX}reward": eval_dict["reward"],
        f"{TAG_PREFIX}pipeline": str(eval_dict.get("pipeline")),
        SET_HASH_TAG: eval_set_hash(eval_dict),
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


def paired_difference(new: list[float], incumbent: list[float], level: float = 0.95) -> StepScore:
    """Mean of the per-sample differences ``new[i] - incumbent[i]`` (same prompt, same seed) and the
    half-width of its t-interval: t_{(1+level)/2, N-1} * s / sqrt(N), ``s`` the sample standard
    deviation of the differences. Needs two equally long lists of N >= 2 finite numbers."""
    if len(new) != len(incumbent) or len(new) < 2:
        raise PromotionError(f"paired scores need two lists of the same length >= 2, got {len(new)} and "
                             f"{len(incumbent)}")
    diff = [_number(a, "rewards") - _number(b, "rewards") for a, b in zip(new, incumbent, strict=True)]
    n = len(diff)
    mean = sum(diff) / n
    sd = math.sqrt(sum((d - mean) ** 2 for d in diff) / (n - 1))
    return StepScore(mean, float(stats.t.ppf((1 + level) / 2, n - 1)) * sd / math.sqrt(n))


def _rewards(entry: Any, label: str) -> list[float] | None:
    model = entry.get(label) if isinstance(entry, dict) else None
    rewards = model.get("rewards") if isinstance(model, dict) else None
    return rewards if isinstance(rewards, list) else None


def paired_scores(new: dict, champion_label_or_eval: str | dict) -> dict[int, StepScore] | None:
    """Paired differences (trained - incumbent) per step count of ``new``: the incumbent's per-sample
    rewards are ``new``'s own ``steps.<n>.<label>`` (a label) or an other eval dict's trained ones;
    None when some step count lacks per-sample rewards."""
    scores = {}
    for key, entry in new["steps"].items():
        mine = _rewards(entry, "trained")
        if isinstance(champion_label_or_eval, str):
            theirs = _rewards(entry, champion_label_or_eval)
        else:
            theirs = _rewards(champion_label_or_eval["steps"].get(key), "trained")
        if mine is None or theirs is None:
            return None
        scores[int(key)] = paired_difference(mine, theirs)
    return scores


def _compare(rule: str, margins: dict[int, float], needed: dict[int, float]) -> tuple[bool, str, dict]:
    """(do the ``margins`` (new - incumbent, per step count) win under ``rule``, a detail line,
    margins); ``needed``: the margin ``all_steps_ci`` asks for at each step count."""
    margins = {n: margins[n] for n in sorted(margins)}
    if rule == "all_steps_ci":
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


def _unpaired(new: dict[int, StepScore], inc: dict[int, StepScore]) -> tuple[dict, dict]:
    """Margins and the needed margins of two independent means (the interval of their difference)."""
    return ({n: new[n].mean - inc[n].mean for n in new},
            {n: math.hypot(new[n].half_width, inc[n].half_width) for n in new})


def _paired(scores: dict[int, StepScore]) -> tuple[dict, dict]:
    return {n: s.mean for n, s in scores.items()}, {n: s.half_width for n, s in scores.items()}


def _champion_margins(new: dict, champion: dict, champion_version: str | None) -> tuple[str, tuple] | str:
    """(how the champion was compared, (margins, needed)), or the reason it cannot be compared."""
    evaluated = new.get("champion")
    if isinstance(evaluated, dict) and champion_version is not None and \
            str(evaluated.get("version")) == str(champion_version):
        paired = paired_scores(new, "champion")
        if paired is not None:
            return "paired, champion re-evaluated on the same samples", _paired(paired)
    if champion.get("reward") != new.get("reward"):
        return f"not comparable: champion scored with {champion.get('reward')!r}, new with {new['reward']!r}"
    champ_scores = trained_scores(champion)
    missing = sorted(set(trained_scores(new)) - set(champ_scores))
    if missing:
        return f"not comparable: champion was not evaluated at step count(s) {missing}"
    mismatch = eval_set_mismatch(new, champion)
    if mismatch:
        return mismatch
    paired = paired_scores(new, champion)
    if paired is not None:
        return "paired, champion's stored per-sample rewards (same eval set)", _paired(paired)
    return "unpaired, champion without per-sample rewards", _unpaired(trained_scores(new), champ_scores)


def decide(rule: str, new: dict, champion: dict | None, champion_version: str | None = None) -> Decision:
    """Alias for the new model under ``rule`` (see the module docstring) given the champion's eval
    (None: no champion yet, the base model of ``new`` is the incumbent) and its version (which
    ``new["champion"]`` must name for the champion's re-evaluation in ``new`` to count)."""
    if rule not in RULES:
        raise PromotionError(f"unknown register.rule {rule!r}; expected one of {', '.join(RULES)}")
    new_scores = trained_scores(new)
    if champion is None:
        base = base_eval(new)
        if base is None:
            return Decision(CHALLENGER, "no current champion, and eval.json has no base numbers to beat")
        wins, detail, margins = _compare(rule, *_unpaired(new_scores, trained_scores(base)))
        verdict = "beats" if wins else "does not beat"
        return Decision(
            CHAMPION if wins else CHALLENGER,
            f"{rule}: no current champion; {verdict} the base model ({detail})",
            margins,
        )
    how = _champion_margins(new, champion, champion_version)
    if isinstance(how, str):
        return Decision(CHALLENGER, how)
    wins, detail, margins = _compare(rule, *how[1])
    verdict = "beats" if wins else "does not beat"
    return Decision(CHAMPION if wins else CHALLENGER, f"{rule}: {verdict} the champion ({how[0]}: {detail})",
                    margins)
