"""The digits rewards and metric find the classifier in the base model directory
(``model.pretrained``/classifier) when the trainer and the evaluation build them, whatever the
working directory (tiny random pipeline + a real classifier, CPU)."""

from __future__ import annotations

import json
import shutil

import torch

from sdpo_core.rewards import build_reward, digits
from sdpo_core.stages import evaluate_stage
from sdpo_core.tiny.classifier import load_or_train_classifier
from sdpo_core.training.trainer import Trainer


def test_trainer_and_evaluate_read_the_model_dirs_classifier(tiny_base, tiny_cfg, tmp_path, monkeypatch):
    """Fails when the trainer or the evaluation builds the reward / metric without model.pretrained
    (they would then look under the working directory and find nothing)."""
    base = tmp_path / "base"
    shutil.copytree(tiny_base, base)
    load_or_train_classifier(base / digits.CLASSIFIER_SUBDIR)
    cfg = tiny_cfg(
        f"model.pretrained={base}", "reward.name=digit_alignment", "evaluate.metrics=[digit_accuracy]",
        "evaluate.steps=[1]", "evaluate.num_prompts=2", "evaluate.samples_per_prompt=1",
    )
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    monkeypatch.chdir(cwd)

    images, labels = digits.load_digit_images("classifier_test")
    prompts = [f"a handwritten digit {d}" for d in labels[:4].tolist()]
    want = build_reward("digit_alignment", {"classifier_path": str(base / "classifier")})(images[:4], prompts)
    trainer = Trainer(cfg, tmp_path / "run")
    assert torch.equal(trainer.reward_fn(images[:4], prompts).cpu(), want)

    result = evaluate_stage(cfg, tmp_path / "run", None)
    entry = result["steps"]["1"]["base"]
    assert result["reward"] == "digit_alignment" and 0.0 <= entry["mean"] <= 1.0
    assert "digit_accuracy" in entry["metrics"]
    assert json.loads((tmp_path / "run" / "eval" / "eval.json").read_text())["reward"] == "digit_alignment"
    assert list(cwd.iterdir()) == []  # nothing looked up or written relative to the working directory
