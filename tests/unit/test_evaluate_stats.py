"""Evaluation statistics, sample plan, table and grid on hand-checkable inputs (no model)."""

from __future__ import annotations

import math

import pytest
import torch

from sdpo_core.config import validate_dict
from sdpo_core.evaluation.evaluate import EvaluateError, eval_plan, format_table, mean_ci, paired_stats
from sdpo_core.evaluation.plots import GridLayout, image_grid


def test_mean_ci_t_interval_by_hand():
    # values 1..5: mean 3; s^2 = (4+1+0+1+4)/4 = 2.5, s = 1.58114; se = s/sqrt(5) = 0.70711;
    # t_{0.975, 4} = 2.77645 -> half width 1.96324 -> [1.03676, 4.96324]
    mean, lo, hi = mean_ci(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]))
    assert mean == 3.0
    assert lo == pytest.approx(1.03676, abs=1e-5) and hi == pytest.approx(4.96324, abs=1e-5)


def test_mean_ci_constant_and_too_few():
    assert mean_ci(torch.full((4,), 2.5)) == (2.5, 2.5, 2.5)
    with pytest.raises(EvaluateError, match="at least 2 values"):
        mean_ci(torch.tensor([1.0]))


def test_paired_stats_by_hand():
    base = torch.tensor([1.0, 2.0, 3.0, 4.0])
    trained = torch.tensor([2.0, 2.0, 5.0, 3.0])
    # diffs [1, 0, 2, -1]: mean 0.5; s^2 = (0.25+0.25+2.25+2.25)/3 = 5/3, s = 1.29099, se = 0.64550;
    # t_{0.975, 3} = 3.18245 -> half width 3.18245 * 0.64550 = 2.05426. Wins: 1 + 0.5 (tie) + 1 + 0 = 2.5 of 4.
    out = paired_stats(base, trained)
    assert out["gain"] == pytest.approx(0.5)
    assert out["gain_ci95"] == [
        pytest.approx(0.5 - 2.05426, abs=1e-5),
        pytest.approx(0.5 + 2.05426, abs=1e-5),
    ]
    assert out["win_rate"] == 0.625


def test_paired_stats_all_ties_and_shape_mismatch():
    x = torch.tensor([0.3, 0.1, 0.2])
    assert paired_stats(x, x.clone()) == {"gain": 0.0, "gain_ci95": [0.0, 0.0], "win_rate": 0.5}
    with pytest.raises(EvaluateError, match="two \\(N,\\) tensors"):
        paired_stats(x, x[:2])


def _cfg(**evaluate):
    return validate_dict({"model": {"pretrained": "unused"}, "evaluate": evaluate}, "test")


def test_eval_plan_cycles_prompts_and_fixes_seeds():
    plan = eval_plan(_cfg(num_prompts=5, samples_per_prompt=2, seed=100), ["p0", "p1", "p2"])
    assert plan.prompts == ["p0", "p1", "p2", "p0", "p1"]
    assert plan.sample_prompts == ["p0", "p0", "p1", "p1", "p2", "p2", "p0", "p0", "p1", "p1"]
    assert plan.groups.tolist() == [0, 0, 1, 1, 2, 2, 0, 0, 1, 1]  # index among the unique prompts
    assert plan.seeds == list(range(100, 110))
    assert plan.grid_samples == [0, 2, 4]  # first sample of each distinct prompt


def test_eval_plan_errors():
    with pytest.raises(EvaluateError, match="eval_fraction"):
        eval_plan(_cfg(), [])
    with pytest.raises(EvaluateError, match=">= 2"):
        eval_plan(_cfg(num_prompts=1, samples_per_prompt=1), ["p"])


def _entry(mean, half):
    return {"mean": mean, "ci95": [mean - half, mean + half], "n": 8, "metrics": {}}


def test_format_table():
    result = {
        "pipeline": "demo",
        "reward": "r",
        "steps": {
            "1": {
                "base": _entry(0.5, 0.1),
                "trained": _entry(0.75, 0.05),
                "gain": 0.25,
                "gain_ci95": [0.125, 0.375],
                "win_rate": 0.875,
            },
            "2": {"base": _entry(1.0, 0.0)},
        },
    }
    lines = format_table(result).splitlines()
    assert lines[0] == "demo: r"
    assert [c.strip() for c in lines[3].split("|")] == [
        "1",
        "0.5000 ± 0.1000",
        "0.7500 ± 0.0500",
        "+0.2500 [+0.1250, +0.3750]",
        "0.88",
    ]
    assert [c.strip() for c in lines[4].split("|")] == ["2", "1.0000 ± 0.0000", "-", "-", "-"]


def test_image_grid_upscales_and_places_cells():
    # 2 panels x 3 rows x 2 cols of 8x8 images: base all black, trained all white
    panels = {"base": torch.zeros(3, 2, 3, 8, 8), "trained": torch.ones(3, 2, 3, 8, 8)}
    grid = image_grid(panels, ["1 step", "2 steps", "4 steps"], ["a cat", "a very long prompt " * 5])
    layout = GridLayout.for_images(2, 3, 2, 8)
    assert layout.cell == 96 and grid.size == layout.size
    x, y = layout.cell_xy(0, 2, 1)
    assert grid.getpixel((x + 48, y + 48)) == (0, 0, 0)
    x, y = layout.cell_xy(1, 0, 0)
    assert grid.getpixel((x + 95, y + 95)) == (255, 255, 255)
    with pytest.raises(ValueError, match="labels"):
        image_grid(panels, ["1 step"], ["a", "b"])
    assert math.isclose(GridLayout.for_images(1, 1, 1, 1024).cell, 256)
