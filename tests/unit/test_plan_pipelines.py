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


def test_a_model_without_configs_is_exit_2_naming_it(capsys):
    assert main(["plan", "--pipeline", "sd-turbo-aesthetic", "--set", "model.pretrained=nobody/nothing"]) == 2
    err = capsys.readouterr().err
    assert "nobody/nothing" in err and "stabilityai/sd-turbo" in err and "Traceback" not in err
