"""The `sdpo` flow on tiny-random: a full run registers a champion (MLflow runs, metrics, artifacts,
DVC lock and remote, Prefect logs and artifact); an equal second run becomes challenger, a third
is skipped when asked (skip_unchanged); a broken
reward fails the run with its cause and leaves the registry alone; a retried run resumes training;
a new run refuses the training an earlier one left in its run dir unless told resume or fresh.

The tests of this module share one checkout and registry and run in order (about 2 min).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from orchestration_testing import TINY

pytestmark = pytest.mark.services
MODEL = "sdpo-tiny-random"
# A first version must beat the base model to become champion: a reward one epoch clearly improves
# (+0.003 mean over 2 prompts), judged by the mean (the CI of 2 prompts is wider than any gain).
IMPROVING = [*TINY, "reward.name=flow_rewards:brightness", "train.learning_rate=1.0",
             "register.rule=mean_over_steps"]


def _run(overrides: list[str], retries: int = 0, fresh: bool = True, **params):
    """A new flow run; ``fresh``: it deletes the training an earlier test left in the run dir."""
    from flows.sdpo_flow import sdpo

    return sdpo.with_options(retries=retries, retry_delay_seconds=0)(
        "tiny-random", overrides, fresh=fresh, return_state=True, **params
    )


def _run_skipping(overrides: list[str]):
    from flows.sdpo_flow import sdpo

    return sdpo("tiny-random", overrides, skip_unchanged=True, fresh=True, return_state=True)


def _client():
    import mlflow

    return mlflow.MlflowClient()


def _flow_run_logs(state) -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=30)
    with get_client(sync_client=True) as client:
        flt = LogFilter(flow_run_id=LogFilterFlowRunId(any_=[state.state_details.flow_run_id]))
        return "\n".join(log.message for log in client.read_logs(log_filter=flt, limit=200))


def _versions() -> list:
    return _client().search_model_versions(f"name='{MODEL}'")


def test_flow_registers_a_champion_with_runs_metrics_artifacts_and_dvc(in_project: Path):
    state = _run(IMPROVING)
    assert state.is_completed(), state.message
    result = state.result()
    client = _client()

    # MLflow: one parent run (params = resolved config) with nested runs per stage
    parent = client.get_run(result["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.params["train.epochs"] == "1"
    assert parent.data.tags["git.commit"] == result["git.commit"] and "dvc.lock_md5" in parent.data.tags
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    by_stage = {r.data.tags["mlflow.runName"].rsplit("-", 1)[1]: r for r in children}
    assert set(by_stage) == {"prepare", "base", "train", "evaluate", "register"}
    train_run = by_stage["train"]
    assert [m.step for m in client.get_metric_history(train_run.info.run_id, "reward/last")] == [0]
    assert {a.path for a in client.list_artifacts(train_run.info.run_id)} >= {
        "config.yaml",
        "train_metrics.csv",
    }
    eval_files = {a.path for a in client.list_artifacts(by_stage["evaluate"].info.run_id)}
    assert eval_files >= {"eval.json", "reward_vs_steps.png", "grid.png"}

    # registry: version 1 is champion, tagged with the evaluation and the provenance
    champion = client.get_model_version_by_alias(MODEL, "champion")
    assert str(champion.version) == result["version"] == "1" and result["alias"] == "champion"
    eval_json = json.loads((in_project / "runs/tiny-random/eval/eval.json").read_text())
    assert float(champion.tags["eval.1.trained_mean"]) == eval_json["steps"]["1"]["trained"]["mean"]
    assert champion.tags["git.commit"] == result["git.commit"]
    assert champion.tags["dvc.model_md5"] == result["dvc.model_md5"]
    assert champion.run_id == by_stage["register"].info.run_id
    from sdpo_core.tracking.champion import audit_entries

    [audit] = audit_entries(champion)  # the alias change, recorded with the flow run that made it
    assert audit["flow_run_id"] == str(state.state_details.flow_run_id) and audit["alias"] == "champion"

    # DVC: the executed stages are locked and their outputs are in the local remote
    lock = (in_project / "dvc.lock").read_text()
    for stage in ("prepare", "base", "train", "evaluate"):
        assert f"{stage}@tiny-random:" in lock
    assert any((in_project / ".dvc" / "remote").rglob("*")), "dvc push wrote nothing to the remote"

    # Prefect: progress and the table in the flow-run logs, the evaluation as an artifact
    logs = _flow_run_logs(state)
    assert "epoch 0:" in logs and "trained mean ± CI95" in logs
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as pc:
        arts = pc.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["sdpo-eval-tiny-random"]))
        )
    assert arts and "trained mean ± CI95" in arts[0].data


def test_a_new_run_refuses_the_earlier_training_in_its_run_dir(in_project: Path):
    """Without resume or fresh, a new flow run fails before any stage, its state message saying
    both ways out, and leaves the earlier training, MLflow and the registry as they were."""
    run_dir = in_project / "runs/tiny-random"
    before = (sorted(p.name for p in (run_dir / "checkpoints").iterdir()), len(_versions()))
    state = _run(IMPROVING, fresh=False)
    assert state.is_failed() and "\n" not in state.message
    assert state.message.startswith("runs/tiny-random holds the training of an earlier run by flow run ")
    assert "pass resume=true" in state.message and "or fresh=true" in state.message
    assert (sorted(p.name for p in (run_dir / "checkpoints").iterdir()), len(_versions())) == before
    flows_runs = _client().search_runs([_client().get_experiment_by_name("sdpo").experiment_id],
                                       "attributes.run_name = 'tiny-random-flow'")
    assert len(flows_runs) == 1  # no parent run opened for the refused one


def test_second_run_that_does_not_beat_the_champion_is_challenger(in_project: Path):
    state = _run(IMPROVING)  # same seed, same data: equal scores, no margin over the champion
    assert state.is_completed(), state.message
    result = state.result()
    assert (result["version"], result["alias"]) == ("2", "challenger")
    client = _client()
    assert str(client.get_model_version_by_alias(MODEL, "champion").version) == "1"
    assert str(client.get_model_version_by_alias(MODEL, "challenger").version) == "2"
    assert "does not beat" in client.get_model_version(MODEL, "2").tags["sdpo.decision"]
    # a new flow run with fresh=true retrains from scratch in the stable run dir (one epoch, not a resumed tail)
    lines = (in_project / "runs/tiny-random/train_metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [0]


def test_run_with_nothing_new_is_skipped_when_asked(in_project: Path):
    """The retrain deployment's skip_unchanged: prompts, config, base and reward are those of the
    versions just registered, so the run ends Completed after prepare, with no new version."""
    from sdpo_core.tracking.inputs import INPUTS_TAG

    before = _versions()
    state = _run_skipping(IMPROVING)
    assert state.is_completed() and state.message == (
        f"nothing changed since version 2 of {MODEL} (run with skip_unchanged=false to train anyway)")
    assert len(_versions()) == len(before) == 2
    assert before[0].tags[INPUTS_TAG] == before[1].tags[INPUTS_TAG]
    changed = _run_skipping([*IMPROVING, "train.learning_rate=0.5"])  # a config change is new input
    assert changed.is_completed() and "nothing changed" not in str(changed.message)
    assert len(_versions()) == 3


def test_failing_stage_fails_the_flow_with_its_cause_and_leaves_the_registry(in_project: Path):
    before = len(_versions())
    state = _run([*TINY, "reward.name=flow_rewards:nan_reward"])
    assert state.is_failed()
    assert "RewardError" in state.message and "non-finite" in state.message
    assert len(_versions()) == before
    parents = _client().search_runs(
        [_client().get_experiment_by_name("sdpo").experiment_id],
        "attributes.run_name = 'tiny-random-flow'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    assert parents[0].info.status == "FAILED"


def test_retried_flow_run_resumes_training_from_its_checkpoint(in_project: Path):
    overrides = [*TINY, "train.epochs=2", "reward.name=flow_rewards:flaky_reward"]
    state = _run(overrides, retries=1)
    assert state.is_completed(), state.message
    logs = _flow_run_logs(state)
    assert "simulated failure" in logs and "attempt 2: resuming from" in logs
    assert "resumed from" in logs and "starting at epoch 1" in logs  # the trainer's own message
    lines = (in_project / "runs/tiny-random/train_metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [0, 1]


def test_register_refuses_a_run_without_valid_evaluation(in_project: Path, tmp_path: Path, capsys):
    from sdpo_core.cli import main

    before = len(_versions())
    run_dir = tmp_path / "run"
    (run_dir / "eval").mkdir(parents=True)
    (run_dir / "eval" / "eval.json").write_text('{"pipeline": "tiny-random", "reward": "r", "steps": {}}')
    assert main(["register", "--pipeline", "tiny-random", "--run-dir", str(run_dir)]) == 2
    assert "not registered" in capsys.readouterr().err
    assert len(_versions()) == before


def test_deployments_on_a_work_pool_take_the_schedule_from_settings(in_project: Path, monkeypatch):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate

    from flows.serve import deploy_to_pool
    from flows.settings import load_settings

    monkeypatch.setenv("SDPO_SCHEDULE__CRON", "*/30 * * * *")  # environment beats orchestration.yaml
    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name="gpu", type="process"))
    deploy_to_pool(load_settings(), "gpu")
    with get_client(sync_client=True) as client:
        train = client.read_deployment_by_name("sdpo/train")
        retrain = client.read_deployment_by_name("sdpo/retrain")
    assert train.work_pool_name == retrain.work_pool_name == "gpu"
    assert [s.schedule.cron for s in retrain.schedules] == ["*/30 * * * *"]
    assert retrain.parameters == {"pipeline": "digits-tiny", "overrides": [], "skip_unchanged": True, "fresh": True}


@pytest.mark.parametrize("family", ["sdxl", "sd3"])
def test_flow_registers_another_family_end_to_end(in_project: Path, family: str):
    # the same flow on other families: only the model directory changes (a tiny SDXL-Turbo or SD3
    # layout where the pipeline's base lives, runs/tiny-random/base: DVC tracks that path). Last
    # in this module: it replaces the tiny base the tests above share.
    import shutil

    import mlflow
    import pandas as pd

    from sdpo_core.tiny.families import build_tiny_sdxl, save_tiny
    from sdpo_core.tiny.flow import build_tiny_sd3

    base = in_project / "runs/tiny-random/base"
    shutil.rmtree(base, ignore_errors=True)
    build_tiny_sdxl(base) if family == "sdxl" else save_tiny(build_tiny_sd3(seed=0), base)
    name = f"sdpo-tiny-{family}"
    state = _run([*IMPROVING, f"register.model_name={name}"])
    assert state.is_completed(), state.message
    result = state.result()
    version = _client().get_model_version(name, result["version"])
    assert version.tags and result["alias"] in ("champion", "challenger")
    meta = json.loads((in_project / "runs/tiny-random/final/sdpo_model.json").read_text())
    assert meta["family"] == family
    # the registered model loads as its family and samples with the training sampler
    model = mlflow.pyfunc.load_model(f"models:/{name}/{result['version']}")
    out = model.predict(pd.DataFrame({"prompt": ["a seven"]}), params={"num_steps": 1})
    assert len(out["image"][0]) > 100


def test_sdpo_core_logs_outside_a_flow_run_warn_nothing(tmp_path: Path):
    # sdpo_core's loggers carry Prefect's API handler (PREFECT_LOGGING_EXTRA_LOGGERS) so that flow
    # runs show their records; the same stages also run outside any flow run (a notebook that
    # imported flows, a worker between runs), where a record must go to the console only, without
    # a "no flow run id" warning per line. A fresh process: Prefect's logging set up as a run does.
    code = (
        "import logging, flows\n"
        "from prefect.logging.configuration import setup_logging\n"
        "setup_logging()\n"
        "assert logging.getLogger('sdpo_core').handlers, 'no Prefect handler on sdpo_core'\n"
        "logging.getLogger('sdpo_core.training.trainer').warning('an epoch outside any flow run')\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_LOGGING")}
    env["PREFECT_HOME"] = str(tmp_path)
    proc = subprocess.run([sys.executable, "-W", "always", "-c", code], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "an epoch outside any flow run" in proc.stderr
    assert "flow run id" not in proc.stderr, proc.stderr[-2000:]
