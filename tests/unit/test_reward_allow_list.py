"""`module:function` rewards come only from modules the operator allows: SDPO_ALLOWED_REWARD_MODULES
or an installed package's `sdpo.rewards` entry point. A refused module is never imported."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sdpo_core.rewards import RewardError, build_reward, validate_reward_name

ROOT = Path(__file__).resolve().parents[2]


def _module(tmp_path: Path, name: str) -> None:
    """A reward module that leaves a mark when imported (to prove a refused one never is)."""
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(f"""
        import pathlib, torch
        pathlib.Path({str(tmp_path / (name + '.imported'))!r}).touch()
        def score(images, prompts):
            return images.mean(dim=(1, 2, 3))
    """))


def test_unlisted_module_is_refused_before_it_is_imported(tmp_path, monkeypatch):
    _module(tmp_path, "operator_reward")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("SDPO_ALLOWED_REWARD_MODULES", "reward_fixtures, operator_reward_other")
    with pytest.raises(RewardError, match=r"module 'operator_reward' is not allowed.*"
                                          r"SDPO_ALLOWED_REWARD_MODULES=operator_reward"):
        validate_reward_name("operator_reward:score")
    assert not (tmp_path / "operator_reward.imported").exists()
    for spec in ("os:system", "subprocess:run", "builtins:exec"):
        with pytest.raises(RewardError, match="is not allowed"):
            build_reward(spec, {"command": "true"})


def test_listed_module_and_its_submodules_are_allowed(tmp_path, monkeypatch):
    _module(tmp_path, "operator_reward")
    (tmp_path / "operator_pkg").mkdir()
    (tmp_path / "operator_pkg" / "__init__.py").write_text("")
    _module(tmp_path / "operator_pkg", "scores")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("SDPO_ALLOWED_REWARD_MODULES", "operator_reward,operator_pkg")
    import torch

    images = torch.rand(2, 3, 8, 8)
    torch.testing.assert_close(build_reward("operator_reward:score")(images, ["a", "b"]), images.mean(dim=(1, 2, 3)))
    validate_reward_name("operator_pkg.scores:score")
    monkeypatch.setenv("SDPO_ALLOWED_REWARD_MODULES", "operator_pkg.scores")
    with pytest.raises(RewardError, match="'operator_pkg' is not allowed"):  # a prefix of a name is not a package
        validate_reward_name("operator_pkg:score")


def test_installed_entry_point_allows_its_module(tmp_path):
    """A distribution on sys.path declaring an `sdpo.rewards` entry point (as `pip install` of a
    plugin leaves it) allows its module, with the environment variable unset."""
    _module(tmp_path, "plugin_rewards")
    info = tmp_path / "sdpo_plugin-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: sdpo-plugin\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[sdpo.rewards]\nmean = plugin_rewards:score\n")
    code = ("from sdpo_core.rewards import validate_reward_name, RewardError\n"
            "validate_reward_name('plugin_rewards:score')\n"
            "try:\n    validate_reward_name('os:system')\nexcept RewardError as e:\n    print('refused:', e)\n")
    env = {"PYTHONPATH": f"{ROOT}:{tmp_path}", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "refused: reward 'os:system': module 'os' is not allowed to provide rewards (allowed: plugin_rewards)" \
        in out.stdout
