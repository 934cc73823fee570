"""Warm start (``model.init_from``, issue 23): a run started from the registry's champion (a real
MLflow store, tests/conftest.py) begins its first epoch with the champion's LoRA weights exactly;
weights that do not fit (another rank, not a model) are refused before training, naming the key."""

from __future__ import annotations

import json

import mlflow
import pytest
import torch

from sdpo_core.families.loading import load_trained
from sdpo_core.training.callbacks import TrainerCallback
from sdpo_core.training.trainer import Trainer
from sdpo_core.training.warm_start import WarmStartError, load_init_weights

NAME = "t-warm"


class FirstEpochWeights(TrainerCallback):
    """The trainable weights as the first epoch starts (before any update)."""

    def __init__(self) -> None:
        self.weights: dict[str, torch.Tensor] | None = None

    def on_epoch_start(self, trainer, epoch: int) -> None:
        if self.weights is None:
            self.weights = trainer.trainable_state()


@pytest.fixture
def champion_run(tiny_cfg, tmp_path):
    """A trained tiny run registered as NAME@champion: (its config, run dir)."""
    from sdpo_core.tracking.registry import register_model

    cfg = tiny_cfg("train.epochs=1", "tracking.backend=mlflow", f"register.model_name={NAME}")
    run_dir = tmp_path / "champion"
    Trainer(cfg, run_dir).run()
    entry = {"trained": {"mean": 0.5, "ci95": [0.45, 0.55], "n": 4}}  # registration needs an evaluation
    (run_dir / "eval").mkdir()
    (run_dir / "eval" / "eval.json").write_text(json.dumps({"reward": "jpeg_compressibility", "steps": {"1": entry}}))
    reg = register_model(cfg, run_dir)
    mlflow.MlflowClient().set_registered_model_alias(NAME, "champion", reg.version)
    return cfg, run_dir


def test_warm_started_run_starts_from_the_champions_weights_exactly(tiny_cfg, champion_run, tmp_path):
    _, champ_dir = champion_run
    family = load_trained(champ_dir / "final")
    expected = load_init_weights(champ_dir / "final", family)
    cold, warm = FirstEpochWeights(), FirstEpochWeights()
    Trainer(tiny_cfg("train.epochs=1"), tmp_path / "cold", callbacks=[cold]).run()
    cfg = tiny_cfg("train.epochs=1", "tracking.backend=mlflow", f"model.init_from=models:/{NAME}@champion")
    Trainer(cfg, tmp_path / "warm", callbacks=[warm]).run()
    assert set(warm.weights) == set(expected) and len(expected) > 0
    for key, value in expected.items():
        assert torch.equal(warm.weights[key], value.float()), key
    assert any(not torch.equal(cold.weights[k], expected[k].float()) for k in expected)  # not the random init


def test_a_run_dir_works_as_well_and_other_ranks_are_refused(tiny_cfg, champion_run, tmp_path):
    _, champ_dir = champion_run
    warm = FirstEpochWeights()
    Trainer(tiny_cfg("train.epochs=1", f"model.init_from={champ_dir}"), tmp_path / "w", callbacks=[warm]).run()
    expected = load_init_weights(champ_dir / "final", load_trained(champ_dir / "final"))
    assert all(torch.equal(warm.weights[k], v.float()) for k, v in expected.items())
    with pytest.raises(WarmStartError, match="model.lora_rank=8"):
        Trainer(tiny_cfg("train.epochs=1", "model.lora_rank=8", f"model.init_from={champ_dir}"), tmp_path / "r").run()
    with pytest.raises(WarmStartError, match="neither a models:/ URI"):
        Trainer(tiny_cfg("train.epochs=1", f"model.init_from={tmp_path}"), tmp_path / "n").run()
