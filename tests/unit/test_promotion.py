"""Promotion rules on hand-built eval dicts: champion vs challenger, invalid evaluations, tag round trip."""

from __future__ import annotations

import json
import math

import pytest

from sdpo_core.tracking.promotion import (
    CHALLENGER,
    CHAMPION,
    PromotionError,
    decide,
    eval_from_tags,
    eval_tags,
    load_eval,
    paired_difference,
)


def _eval(means: dict[int, float], half: float = 0.1, reward: str = "r") -> dict:
    steps = {
        str(n): {
            "base": {"mean": 0.0, "ci95": [-half, half], "n": 8},
            "trained": {"mean": m, "ci95": [m - half, m + half], "n": 8},
            "gain": m,
            "gain_ci95": [m - half, m + half],
            "win_rate": 0.5,
        }
        for n, m in means.items()
    }
    return {"pipeline": "p", "reward": reward, "steps": steps}


def test_first_version_that_beats_the_base_is_champion():
    # base 0.0 +- 0.1 (see _eval); trained 0.5 +- 0.1: margin 0.5 > hypot(0.1, 0.1) = 0.1414
    decision = decide("all_steps_ci", _eval({1: 0.5}), None)
    assert decision.alias == CHAMPION and "beats the base model" in decision.reason
    assert decision.margins == {1: pytest.approx(0.5)}


@pytest.mark.parametrize("rule", ["all_steps_ci", "all_steps_mean", "mean_over_steps"])
def test_first_version_that_does_not_beat_the_base_is_challenger(rule):
    # the incident: gain -0.001 at 1 step (CI across zero) was promoted because nothing held the title
    decision = decide(rule, _eval({1: -0.001}), None)
    assert decision.alias == CHALLENGER
    assert "no current champion; does not beat the base model" in decision.reason


def test_first_version_inside_the_base_ci_is_challenger():
    # +0.14 over the base is inside the needed 0.1414 under all_steps_ci, a win under all_steps_mean
    new = _eval({1: 0.14})
    assert decide("all_steps_ci", new, None).alias == CHALLENGER
    assert decide("all_steps_mean", new, None).alias == CHAMPION


def test_first_version_without_base_numbers_is_challenger():
    new = _eval({1: 0.5})
    del new["steps"]["1"]["base"]
    decision = decide("all_steps_mean", new, None)
    assert decision.alias == CHALLENGER and "no base numbers" in decision.reason


@pytest.mark.parametrize(
    ("new", "alias"),
    [
        # champion 0.5 +- 0.1 at both steps; needed margin sqrt(0.1^2 + 0.1^2) = 0.14142
        ({1: 0.65, 2: 0.65}, CHAMPION),  # +0.15 > 0.14142 at both
        ({1: 0.65, 2: 0.64}, CHALLENGER),  # +0.14 at 2 steps is inside the CI
        ({1: 0.9, 2: 0.5}, CHALLENGER),  # a tie at one step count is not a win
    ],
)
def test_all_steps_ci(new, alias):
    assert decide("all_steps_ci", _eval(new), _eval({1: 0.5, 2: 0.5})).alias == alias


def test_all_steps_ci_combines_half_widths_in_quadrature():
    # half-widths 0.3 and 0.4 -> needed margin 0.5 exactly; 0.49 loses, 0.51 wins
    champ = _eval({1: 0.0}, half=0.4)
    assert decide("all_steps_ci", _eval({1: 0.49}, half=0.3), champ).alias == CHALLENGER
    decision = decide("all_steps_ci", _eval({1: 0.51}, half=0.3), champ)
    assert decision.alias == CHAMPION and decision.margins == {1: pytest.approx(0.51)}


def test_all_steps_mean_and_mean_over_steps():
    champ = _eval({1: 0.5, 2: 0.5})
    mixed = _eval({1: 0.8, 2: 0.4})  # better on average (+0.1), worse at 2 steps
    assert decide("all_steps_mean", mixed, champ).alias == CHALLENGER
    assert decide("mean_over_steps", mixed, champ).alias == CHAMPION
    assert decide("all_steps_mean", _eval({1: 0.51, 2: 0.5001}), champ).alias == CHAMPION
    assert decide("mean_over_steps", _eval({1: 0.5, 2: 0.5}), champ).alias == CHALLENGER  # equal is no win


def test_not_comparable_becomes_challenger():
    champ = _eval({1: 0.0})
    other_reward = decide("all_steps_mean", _eval({1: 9.0}, reward="other"), champ)
    assert other_reward.alias == CHALLENGER and "not comparable" in other_reward.reason
    more_steps = decide("all_steps_mean", _eval({1: 9.0, 4: 9.0}), champ)
    assert more_steps.alias == CHALLENGER and "[4]" in more_steps.reason


def test_unknown_rule():
    with pytest.raises(PromotionError, match="unknown register.rule"):
        decide("best", _eval({1: 0.0}), None)


def test_tags_round_trip_exactly():
    ev = _eval({1: 1 / 3, 8: math.pi})
    tags = eval_tags(ev)
    assert all(isinstance(v, str) for v in tags.values())
    back = eval_from_tags(tags)
    assert back["reward"] == "r"
    assert back["steps"]["8"]["trained"]["mean"] == math.pi
    assert back["steps"]["1"]["trained"]["ci95"] == ev["steps"]["1"]["trained"]["ci95"]
    assert eval_from_tags({"eval.reward": "r"}) is None  # a version without eval tags


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "no evaluation"),
        ("{not json", "not valid JSON"),
        (json.dumps({"reward": "r", "steps": {}}), "missing or empty"),
        (
            json.dumps({"reward": "r", "steps": {"1": {"base": {"mean": 0, "ci95": [0, 0]}}}}),
            "no trained model",
        ),
        (json.dumps(_eval({1: float("nan")})), "finite number"),
    ],
)
def test_invalid_evaluations_raise(tmp_path, content, message):
    path = tmp_path / "eval.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(PromotionError, match=message):
        load_eval(path)


def test_valid_evaluation_loads(tmp_path):
    path = tmp_path / "eval.json"
    path.write_text(json.dumps(_eval({1: 0.2, 2: 0.3})))
    assert load_eval(path)["steps"]["2"]["trained"]["mean"] == 0.3


# ------------------------------------------------------------------ paired comparison (issue 23)
def _with_samples(trained: list[float], champion: list[float] | None = None, **fields) -> dict:
    """An eval dict at 1 step with per-sample rewards (trained, and the champion's re-evaluation)."""
    import torch

    from sdpo_core.evaluation.evaluate import mean_ci  # the stage's own interval, for the summaries

    def summary(rewards):
        mean, lo, hi = mean_ci(torch.tensor(rewards))
        return {"mean": mean, "ci95": [lo, hi], "n": len(rewards), "rewards": rewards}

    entry = {"trained": summary(trained)}
    result = {"pipeline": "p", "reward": "r", "prompts": ["a", "b"], "num_prompts": 2, "samples_per_prompt": 2,
              "seed": 7, "eta": 1.0, "last_step": False, "guidance_scale": 1.0, "mixed_precision": "no",
              "steps": {"1": entry}, **fields}
    if champion is not None:
        entry["champion"] = summary(champion)
        result["champion"] = {"name": "m", "version": "3"}
    return result


# the champion's samples vary a lot from sample to sample; the challenger is better on every one of
# them by 0.05 +- 0.01: the independent intervals overlap, the paired one is far from 0
CHAMP = [0.1, 0.9, 0.3, 0.7]
CHALL = [0.16, 0.94, 0.35, 0.76]


def test_paired_rule_promotes_a_challenger_the_unpaired_rule_cannot():
    new, champion = _with_samples(CHALL, CHAMP), _with_samples(CHAMP)
    del champion["steps"]["1"]["trained"]["rewards"]  # no samples: only the unpaired comparison is possible
    unpaired = decide("all_steps_ci", new, champion, champion_version="2")  # the re-evaluation is of v3
    assert unpaired.alias == CHALLENGER and "unpaired" in unpaired.reason
    paired = decide("all_steps_ci", new, champion, champion_version="3")
    assert paired.alias == CHAMPION and "paired, champion re-evaluated" in paired.reason
    assert paired.margins == {1: pytest.approx(0.0525)}


def test_paired_difference_is_the_t_interval_of_the_differences():
    score = paired_difference(CHALL, CHAMP)
    diffs = [a - b for a, b in zip(CHALL, CHAMP, strict=True)]  # 0.06, 0.04, 0.05, 0.06
    sd = math.sqrt(sum((d - 0.0525) ** 2 for d in diffs) / 3)
    assert score.mean == pytest.approx(0.0525) and score.half_width == pytest.approx(3.182446 * sd / 2, rel=1e-6)


def test_stored_champion_samples_are_paired_only_when_the_eval_set_matches():
    new, champion = _with_samples(CHALL), _with_samples(CHAMP)
    decision = decide("all_steps_ci", new, champion, champion_version="3")
    assert decision.alias == CHAMPION and "stored per-sample rewards" in decision.reason


@pytest.mark.parametrize(("field", "value"), [("prompts", ["a", "c"]), ("seed", 8), ("eta", 0.5),
                                              ("samples_per_prompt", 1), ("mixed_precision", "bf16"),
                                              ("guidance_scale", 2.0), ("last_step", True)])
def test_evaluations_of_different_sets_are_never_compared_and_the_reason_names_the_field(field, value):
    new, champion = _with_samples(CHALL), _with_samples(CHAMP, **{field: value})
    decision = decide("all_steps_mean", new, champion, champion_version="3")
    assert decision.alias == CHALLENGER and f"not comparable: the evaluations' {field} differ" in decision.reason


def test_eval_set_hash_is_tagged_and_changes_with_the_settings():
    from sdpo_core.tracking.promotion import SET_HASH_TAG, eval_set_hash

    a = _with_samples(CHALL)
    assert eval_tags(a)[SET_HASH_TAG] == eval_set_hash(a) == eval_set_hash(_with_samples(CHAMP))
    assert eval_set_hash(_with_samples(CHALL, seed=8)) != eval_set_hash(a)
