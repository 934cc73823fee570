"""The retraining story of issue 23 as a user runs it, through subprocesses:

    sdpo stack up                      (a real Prefect server, a real MLflow server, serve)
    prefect deployment run sdpo/retrain --param overrides=[...cold...] --watch     week 0: the champion
    <a new prompt file lands in the S3 bucket>
    prefect deployment run sdpo/retrain --watch     trained warm, champion re-evaluated, paired decision
    prefect deployment run sdpo/retrain --watch     nothing new: Completed, "nothing changed since ..."
    sdpo stack down

The deployment's parameters come from orchestration settings (SDPO_SCHEDULE__*), as a user sets
them: the tiny-random pipeline reading s3://sdpo-incoming/prompts.jsonl (moto's S3 server, a
versioned bucket) and warm-starting from models:/sdpo-e2e@champion; week 0, with no champion yet,
overrides them without the warm start. Every server is on 127.0.0.1. About 3 minutes."""

from __future__ import annotations

import json
import os
import re

import pytest
from orchestration_testing import (
    BIN,
    GIT_IDENTITY,
    OFFLINE_ENV,
    ROOT,
    TINY,
    exports,
    free_port,
    make_project,
    run_ok,
    versioned_bucket,
)

pytestmark = pytest.mark.services
BUCKET, KEY, MODEL = "sdpo-incoming", "prompts.jsonl", "sdpo-e2e"
COLD = [*TINY, "reward.name=flow_rewards:brightness", "train.learning_rate=1.0", "register.rule=mean_over_steps",
        f"prompts.source=s3://{BUCKET}/{KEY}", "prompts.eval_fraction=0.5", f"register.model_name={MODEL}"]
WARM = [*COLD, f"model.init_from=models:/{MODEL}@champion"]


@pytest.fixture
def bucket(tmp_path, monkeypatch):
    with versioned_bucket(BUCKET, tmp_path / "moto.log", monkeypatch) as client:
        yield client


@pytest.fixture
def stack(tmp_path, bucket):
    """`sdpo stack up` in a fresh checkout with the retrain deployment configured as above; yields
    (project, shell env with the stack's exports); `sdpo stack down` afterwards (SIGINT to each)."""
    project = make_project(tmp_path / "project")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SDPO_", "PREFECT_", "MLFLOW_"))}
    env.update({**OFFLINE_ENV, **GIT_IDENTITY, "PYTHONPATH": str(project),
                "SDPO_ALLOWED_REWARD_MODULES": os.environ["SDPO_ALLOWED_REWARD_MODULES"],
                "DVC_SITE_CACHE_DIR": str(project / ".dvc/tmp/site-cache"),
                "SDPO_PREFECT__PORT": str(free_port()), "SDPO_MLFLOW__PORT": str(free_port()), "SDPO_PREFECT__POLL_SECONDS": "1",
                "SDPO_SCHEDULE__PIPELINE": "tiny-random", "SDPO_SCHEDULE__OVERRIDES": json.dumps(WARM),
                "SDPO_SCHEDULE__ACTIVE": "false"})  # no cron run racing the test's runs
    (project / "flow_rewards.py").write_text((ROOT / "tests/flows/flow_rewards.py").read_text())
    up = run_ok([str(BIN / "sdpo"), "stack", "up"], env, project, timeout=240)
    try:
        yield project, {**env, **exports(up.stdout)}
    finally:
        run_ok([str(BIN / "sdpo"), "stack", "down"], env, project, timeout=180)


def _land(bucket, words: str) -> str:
    """A new prompt file in the bucket; returns its S3 version id."""
    body = "".join(json.dumps({"prompt": f"a {words} number {i}", "batch": words}) + "\n" for i in range(4))
    return bucket.put_object(Bucket=BUCKET, Key=KEY, Body=body.encode())["VersionId"]


def _retrain(project, shell, *params: str) -> tuple[dict, str]:
    """`prefect deployment run sdpo/retrain --watch`; (the flow run as `prefect flow-run inspect`
    shows it, its logs as `prefect flow-run logs` prints them)."""
    run = [str(BIN / "prefect"), "deployment", "run", "sdpo/retrain", *params, "--watch", "--watch-timeout", "500"]
    out = run_ok(run, shell, project, timeout=540)
    flow_run_id = re.search(r"UUID:\s+([0-9a-f-]{36})", out.stdout).group(1)
    inspect = run_ok([str(BIN / "prefect"), "flow-run", "inspect", flow_run_id, "-o", "json"], shell, project, 60)
    logs = run_ok([str(BIN / "prefect"), "flow-run", "logs", flow_run_id], shell, project, 60)
    return json.loads(inspect.stdout), logs.stdout


def test_scheduled_deployment_trains_warm_decides_paired_and_skips(stack, bucket):
    import mlflow

    from sdpo_core.tracking.champion import audit_entries

    project, shell = stack
    client = mlflow.MlflowClient(shell["MLFLOW_TRACKING_URI"])
    _land(bucket, "red")
    week0, _ = _retrain(project, shell, "--param", f"overrides={json.dumps(COLD)}")
    assert week0["state"]["type"] == "COMPLETED", week0["state"]
    assert client.get_model_version_by_alias(MODEL, "champion").version == "1"

    version_id = _land(bucket, "blue")
    week1, logs = _retrain(project, shell)  # the deployment's own parameters: warm from the champion
    assert week1["state"]["type"] == "COMPLETED", week1["state"]
    assert week1["parameters"]["skip_unchanged"] is True and week1["parameters"]["overrides"] == WARM
    assert f"warm start: the LoRA starts from models:/{MODEL}@champion" in logs
    manifest = json.loads((project / "runs/tiny-random/prompts/manifest.json").read_text())
    assert manifest["source_version"]["version_id"] == version_id
    evaluated = json.loads((project / "runs/tiny-random/eval/eval.json").read_text())
    assert evaluated["champion"]["version"] == "1"  # re-evaluated on the new held-out prompts
    new_eval = (project / "runs/tiny-random/prompts/eval.txt").read_text().splitlines()
    assert set(evaluated["prompts"]) <= set(new_eval) and all("blue" in p for p in evaluated["prompts"])
    record = audit_entries(client.get_model_version(MODEL, "2"))[-1]
    assert "(paired, champion re-evaluated on the same samples" in record["reason"]
    assert record["flow_run_id"] == week1["id"]
    champion = client.get_model_version_by_alias(MODEL, "champion").version
    assert champion == ("2" if record["alias"] == "champion" else "1")  # promoted or not, as recorded

    week2, _ = _retrain(project, shell)  # nothing new in the bucket
    assert week2["state"]["type"] == "COMPLETED", week2["state"]
    assert week2["state"]["message"].startswith(f"nothing changed since version 2 of {MODEL}")
    assert len(client.search_model_versions(f"name='{MODEL}'")) == 2
