"""The retraining story of issue 23, end to end: real Prefect (test harness API), a real MLflow
store and moto's S3 server on 127.0.0.1. Week 0 trains a champion cold; each later week a new
prompt file lands in the bucket and the scheduled run trains warm from the champion, evaluates the
new model and the champion on the new held-out prompts and decides on paired differences; a week
with nothing new is skipped. About 6 minutes (four flow runs)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from orchestration_testing import TINY, versioned_bucket

pytestmark = pytest.mark.services
BUCKET, KEY, MODEL = "sdpo-incoming", "prompts.jsonl", "sdpo-e2e"
SOURCE = f"s3://{BUCKET}/{KEY}"
WEEK = [*TINY, "reward.name=flow_rewards:brightness", "train.learning_rate=1.0", "register.rule=mean_over_steps",
        f"prompts.source={SOURCE}", "prompts.eval_fraction=0.5", f"register.model_name={MODEL}"]
WARM = [*WEEK, f"model.init_from=models:/{MODEL}@champion"]


@pytest.fixture
def bucket(tmp_path, monkeypatch):
    with versioned_bucket(BUCKET, tmp_path / "moto.log", monkeypatch) as client:
        yield client


def _land(bucket, words: str) -> str:
    """A new prompt file in the bucket; returns its S3 version id."""
    body = "".join(json.dumps({"prompt": f"a {words} number {i}", "batch": words}) + "\n" for i in range(4))
    return bucket.put_object(Bucket=BUCKET, Key=KEY, Body=body.encode())["VersionId"]


def _week(overrides: list[str]):
    from flows.sdpo_flow import sdpo

    return sdpo("tiny-random", overrides, skip_unchanged=True, return_state=True)


def _eval(project: Path) -> dict:
    return json.loads((project / "runs/tiny-random/eval/eval.json").read_text())


def _warm_week(bucket, project: Path, words: str, champion: str) -> dict:
    """A week with new prompts: trained warm, the champion re-evaluated on the new eval prompts."""
    version_id = _land(bucket, words)
    state = _week(WARM)
    assert state.is_completed(), state.message
    manifest = json.loads((project / "runs/tiny-random/prompts/manifest.json").read_text())
    assert manifest["source_version"]["version_id"] == version_id
    evaluated = _eval(project)
    assert evaluated["champion"]["version"] == champion
    new_eval = (project / "runs/tiny-random/prompts/eval.txt").read_text().splitlines()
    assert set(evaluated["prompts"]) <= set(new_eval) and all(words in p for p in evaluated["prompts"])
    result = state.result()
    assert "(paired, champion re-evaluated on the same samples" in result["reason"]
    assert f"warm start: the LoRA starts from models:/{MODEL}@champion" in _logs(state)
    return result


def _logs(state) -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=30)
    with get_client(sync_client=True) as client:
        flt = LogFilter(flow_run_id=LogFilterFlowRunId(any_=[state.state_details.flow_run_id]))
        logs, page = [], None
        while page is None or len(page) == 200:  # the API's largest page
            page = client.read_logs(log_filter=flt, limit=200, offset=len(logs))
            logs += page
    return "\n".join(log.message for log in logs)


def test_scheduled_retraining_warm_paired_and_skipped(in_project: Path, bucket):
    import mlflow

    from sdpo_core.tracking.champion import audit_entries

    _land(bucket, "red")
    first = _week(WEEK)  # week 0: no champion yet, trained from the base
    assert first.is_completed(), first.message
    assert first.result()["alias"] == "champion"

    second = _warm_week(bucket, in_project, "blue", champion="1")
    client = mlflow.MlflowClient()
    champion = str(client.get_model_version_by_alias(MODEL, "champion").version)
    assert champion == ("2" if second["alias"] == "champion" else "1")
    third = _warm_week(bucket, in_project, "green", champion=champion)
    record = audit_entries(client.get_model_version(MODEL, third["version"]))[-1]
    assert record["reason"] == third["reason"] and record["flow_run_id"]

    skipped = _week(WARM)  # nothing new since the third week's version
    assert skipped.is_completed()
    assert skipped.message.startswith(f"nothing changed since version {third['version']} of {MODEL}")
    assert len(client.search_model_versions(f"name='{MODEL}'")) == 3
