"""Audit and rollback of ``champion`` (issue 23) against a real ``mlflow server`` on 127.0.0.1:
every alias change is recorded on the versions, ``sdpo promote NAME --rollback`` gives the alias
back to the version it was taken from, ``--version N`` moves it by hand; bad requests exit 2 and
change nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fault_servers import MlflowServer

from sdpo_core.cli import main
from sdpo_core.tracking.champion import audit_entries
from sdpo_core.tracking.registry import register_model
from sdpo_core.training.trainer import Trainer

pytestmark = pytest.mark.services
NAME = "t-audit"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = MlflowServer(tmp_path_factory.mktemp("mlflow"))
    srv.start()
    yield srv
    srv.kill()


def _write_eval(run_dir: Path, base: list[float], trained: list[float]) -> None:
    """eval.json at 1 step with per-sample rewards, the same eval set every time."""

    def summary(r):
        m = sum(r) / len(r)
        return {"mean": m, "ci95": [m - 0.01, m + 0.01], "n": len(r), "rewards": r}

    (run_dir / "eval").mkdir(exist_ok=True)
    (run_dir / "eval" / "eval.json").write_text(json.dumps({
        "pipeline": "tiny-random", "reward": "jpeg_compressibility", "prompts": ["p"], "seed": 1,
        "num_prompts": 1, "samples_per_prompt": 4, "steps": {"1": {"base": summary(base), "trained": summary(trained)}},
    }))


def test_alias_changes_are_recorded_and_rollback_goes_back(server, monkeypatch, tiny_cfg, tmp_path, capsys):
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
    client = mlflow.MlflowClient(tracking_uri=server.url)
    cfg = tiny_cfg("train.epochs=1", "tracking.backend=mlflow", f"register.model_name={NAME}")
    run_dir = tmp_path / "run"
    Trainer(cfg, run_dir).run()
    _write_eval(run_dir, [0.0, 0.1, 0.0, 0.1], [0.5, 0.6, 0.5, 0.6])
    v1 = register_model(cfg, run_dir)
    # v2: better than v1 by 0.1 on every sample: paired against v1's stored per-sample rewards
    _write_eval(run_dir, [0.0, 0.1, 0.0, 0.1], [0.6, 0.7, 0.6, 0.7])
    v2 = register_model(cfg, run_dir, flow_run_id="flow-run-2")
    assert (v1.alias, v2.alias) == ("champion", "champion") and "stored per-sample rewards" in v2.reason
    [entry] = audit_entries(client.get_model_version(NAME, v2.version))
    assert (entry["action"], entry["previous"], entry["flow_run_id"]) == ("register", "1", "flow-run-2")
    assert entry["margins"] == {"1": pytest.approx(0.1)} and entry["reason"] == v2.reason

    assert main(["promote", NAME, "--rollback"]) == 0
    assert "version 2 -> 1" in capsys.readouterr().out
    assert client.get_model_version_by_alias(NAME, "champion").version in ("1", 1)
    back = audit_entries(client.get_model_version(NAME, "1"))[-1]
    assert (back["action"], back["alias"], back["previous"]) == ("rollback", "champion", "2")
    assert "does not beat the champion" in back["reason"]  # the rule's view is kept, not obeyed
    lost = audit_entries(client.get_model_version(NAME, "2"))[-1]
    assert (lost["action"], lost["alias"]) == ("rollback", "-champion")

    assert main(["promote", NAME, "--rollback"]) == 2  # v1 took the title from no one
    assert "nothing to roll back to" in capsys.readouterr().err
    assert main(["promote", NAME, "--version", "9"]) == 2
    assert "has no version '9'" in capsys.readouterr().err
    assert client.get_model_version_by_alias(NAME, "champion").version in ("1", 1)  # nothing moved

    assert main(["promote", NAME, "--version", "2", "--reason", "rollback undone"]) == 0
    again = audit_entries(client.get_model_version(NAME, "2"))[-1]
    assert (again["action"], again["previous"]) == ("promote", "1") and "rollback undone" in again["reason"]
    assert client.get_model_version_by_alias(NAME, "champion").version in ("2", 2)
