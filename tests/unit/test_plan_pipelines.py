"""``sdpo plan`` prints a budget for every shipped pipeline, offline, through the real CLI."""

import pytest

from sdpo_core.cli import main
from sdpo_core.config import pipeline_names


@pytest.mark.parametrize("name", pipeline_names())
def test_plan_prints_a_budget(name, capsys):
    assert main(["plan", "--pipeline", name, "--gpu-memory", "80"]) == 0
    out = capsys.readouterr().out
    assert f"memory plan for '{name}'" in out and "peak" in out and "activations" in out
    assert "fits in 80.0 GiB" in out  # every shipped pipeline is sized for one 80 GB GPU
