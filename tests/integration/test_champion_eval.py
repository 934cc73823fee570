"""Champion and challenger judged on the same ground (issue 23), on the tiny pipeline and a real
MLflow store (tests/conftest.py: one sqlite store per test): the champion, trained and evaluated on
prompt set A, is re-evaluated on the challenger's eval prompts (set B) before the decision; the
decision is paired and recorded on the versions."""

from __future__ import annotations

import json
import os
from pathlib import Path

import mlflow

from sdpo_core.evaluation.evaluate import evaluate
from sdpo_core.prompts import load_split
from sdpo_core.rundir.paths import eval_dir, prompts_dir
from sdpo_core.stages import evaluate_stage, prepare_stage
from sdpo_core.tracking.champion import audit_entries
from sdpo_core.tracking.promotion import SET_HASH_TAG, eval_set_hash
from sdpo_core.tracking.registry import register_model
from sdpo_core.training.trainer import Trainer

NAME = "t-same-ground"


def _run(tiny_cfg, tmp_path: Path, label: str, prompts: list[str]):
    source = tmp_path / f"prompts_{label}.txt"
    source.write_text("\n".join(prompts) + "\n")
    cfg = tiny_cfg("train.epochs=1", "tracking.backend=mlflow", f"register.model_name={NAME}",
                   f"prompts.source={source}", "prompts.eval_fraction=0.5")
    run_dir = tmp_path / label
    prepare_stage(cfg, run_dir)
    Trainer(cfg, run_dir, train_prompts=load_split(prompts_dir(run_dir)).train).run()
    return cfg, run_dir


def test_champion_is_reevaluated_on_the_challengers_prompts_before_the_decision(tiny_cfg, tmp_path):
    client = mlflow.MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"])
    cfg_a, run_a = _run(tiny_cfg, tmp_path, "a", [f"a red digit {i}" for i in range(8)])
    eval_a = evaluate_stage(cfg_a, run_a, run_a / "final")
    assert "champion" not in eval_a  # nothing registered yet
    first = register_model(cfg_a, run_a)
    if first.alias != "champion":  # setup: v1 must hold the title, whatever its margin over the base
        client.set_registered_model_alias(NAME, "champion", first.version)

    cfg_b, run_b = _run(tiny_cfg, tmp_path, "b", [f"a blue number {i}" for i in range(8)])
    eval_b = evaluate_stage(cfg_b, run_b, run_b / "final")
    eval_prompts_b = load_split(prompts_dir(run_b)).eval
    assert set(eval_b["prompts"]) <= set(eval_prompts_b) and not set(eval_b["prompts"]) & set(eval_a["prompts"])
    assert eval_b["champion"] == {"name": NAME, "version": "1", "model_uri": f"models:/{NAME}/1"}
    # the champion's scores are those of its weights on B's samples: evaluate run A's model there
    direct = evaluate(cfg_b, cfg_b.model.pretrained, run_a / "final", eval_prompts_b, tmp_path / "direct")
    for n, entry in eval_b["steps"].items():
        assert entry["champion"]["rewards"] == direct["steps"][n]["trained"]["rewards"]
        assert entry["trained"]["rewards"] != entry["champion"]["rewards"]
        assert "gain" in entry["vs_champion"]
    assert json.loads((eval_dir(run_b) / "eval.json").read_text())["champion"]["version"] == "1"

    second = register_model(cfg_b, run_b)
    assert "the champion (paired, champion re-evaluated on the same samples" in second.reason
    v2 = client.get_model_version(NAME, second.version)
    assert v2.tags[SET_HASH_TAG] == eval_set_hash(eval_b) != eval_set_hash(eval_a)
    [entry] = audit_entries(v2)
    assert (entry["alias"], entry["previous"], entry["reason"]) == (second.alias, "1", second.reason)
    assert set(entry["margins"]) == {"1", "2"}
