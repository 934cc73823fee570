"""The orchestration stack as a user drives it, through subprocesses:

    sdpo stack up                      (Prefect server, MLflow server with S3 artifacts, serve)
    prefect deployment run sdpo/train --params ... --watch
    git clone + sdpo version --pull + sdpo evaluate   (a fresh checkout restores the model via DVC/S3)
    sdpo stack down

S3 is moto's server mode on 127.0.0.1. The tests of this module run in order (about 2.5 min).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
from orchestration_testing import (
    BIN,
    GIT_IDENTITY,
    OFFLINE_ENV,
    TINY,
    exports,
    free_port,
    git,
    make_project,
    run_ok,
    start,
    stop,
    wait_http,
)

pytestmark = pytest.mark.services
MODEL = "sdpo-tiny-random"

BUCKET = "sdpo-e2e"
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    proc = start(
        [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], log, {**os.environ, **AWS_ENV}
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url, 30, proc)
        import boto3

        boto3.client("s3", endpoint_url=url, **_boto_kwargs()).create_bucket(Bucket=BUCKET)
        yield url
    finally:
        stop(proc)


def _boto_kwargs() -> dict[str, str]:
    return {
        "aws_access_key_id": AWS_ENV["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": AWS_ENV["AWS_SECRET_ACCESS_KEY"],
        "region_name": AWS_ENV["AWS_DEFAULT_REGION"],
    }


@pytest.fixture(scope="session")
def s3_client(s3_endpoint):
    import boto3

    return boto3.client("s3", endpoint_url=s3_endpoint, **_boto_kwargs())


@pytest.fixture(scope="module")
def user_env(s3_endpoint, tmp_path_factory) -> dict[str, str]:
    """A user's shell: offline, test credentials, settings for S3 (DVC remote, MLflow artifacts)
    and free ports for the stack."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SDPO_", "PREFECT_", "MLFLOW_"))}
    env.update(OFFLINE_ENV)
    env.update(AWS_ENV)
    env.update(GIT_IDENTITY)  # the version task commits dvc.lock
    env.update(
        {
            "SDPO_PREFECT__PORT": str(free_port()),
            "SDPO_PREFECT__POLL_SECONDS": "1",
            "SDPO_MLFLOW__PORT": str(free_port()),
            "SDPO_MLFLOW__SERVE_ARTIFACTS": "false",  # clients write S3 themselves (MLFLOW_S3_ENDPOINT_URL)
            "SDPO_S3__ENDPOINT_URL": s3_endpoint,
            "SDPO_S3__BUCKET": BUCKET,
            "SDPO_S3__PREFIX": "e2e",
            "SDPO_DVC__GIT_COMMIT": "true",  # the clone below must see dvc.lock
        }
    )
    return env


# A background job of a non-interactive shell, as a script or CI runner starts it: bash starts
# `cmd &` with SIGINT (and SIGQUIT) ignored when job control is off, and children inherit that.
BACKGROUND_JOB = ["bash", "-c", '"$@" & wait $!', "bash"]
SIGINT_BIT = 1 << (2 - 1)  # bit n-1 of /proc/PID/status's SigIgn mask is signal n


def _ignores_sigint(pid: int) -> bool:
    line = next(li for li in Path(f"/proc/{pid}/status").read_text().splitlines() if li.startswith("SigIgn:"))
    return bool(int(line.split()[1], 16) & SIGINT_BIT)


@pytest.fixture(scope="module")
def stack(tmp_path_factory, user_env):
    """`sdpo stack up` in a fresh checkout, started with SIGINT ignored; yields (project, shell env
    with the exports)."""
    project = make_project(tmp_path_factory.mktemp("e2e") / "project")
    up = run_ok([*BACKGROUND_JOB, str(BIN / "sdpo"), "stack", "up"], user_env, project, timeout=240)
    shell = {**user_env, **exports(up.stdout)}
    assert shell["PREFECT_API_URL"].startswith("http://127.0.0.1:")
    yield project, shell
    if (project / ".sdpo-stack/stack.json").exists():  # a test failed before its own `stack down`
        subprocess.run([str(BIN / "sdpo"), "stack", "down"], env=user_env, cwd=project, timeout=180)


def test_deployment_run_trains_and_registers_with_s3_artifacts(stack, s3_client, monkeypatch):
    project, shell = stack
    params = json.dumps({"pipeline": "tiny-random", "overrides": TINY})
    run = [str(BIN / "prefect"), "deployment", "run", "sdpo/train", "--params", params, "--watch"]
    out = run_ok(run, shell, project, timeout=400)
    assert "Completed" in out.stdout + out.stderr

    import mlflow
    import pandas as pd

    for key in (
        "MLFLOW_TRACKING_URI",
        "MLFLOW_S3_ENDPOINT_URL",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
    ):
        monkeypatch.setenv(key, shell[key])
    client = mlflow.MlflowClient(shell["MLFLOW_TRACKING_URI"])
    # version 1 is champion only if it beat the base (tests/flows trains one that does)
    champion = client.get_model_version(MODEL, "1")
    assert champion.tags["git.commit"] and champion.tags["dvc.model_md5"].endswith(".dir")
    keys = [o["Key"] for o in s3_client.list_objects_v2(Bucket=BUCKET, Prefix="e2e/mlflow/")["Contents"]]
    assert any(k.endswith("eval.json") for k in keys), keys
    assert any("/artifacts/final/sdpo_model.json" in k for k in keys), keys  # the model's LoRA dir

    # the registered model is self-contained: base + LoRA from S3, images from prompts
    model = mlflow.pyfunc.load_model(f"models:/{MODEL}/1")
    images = model.predict(pd.DataFrame({"prompt": ["a seven"]}), params={"num_steps": 1})
    assert images["image"][0].startswith("iVBOR")  # base64 of the PNG signature


def test_fresh_clone_pulls_the_model_from_s3_and_evaluates_it(stack, s3_client, tmp_path):
    project, shell = stack
    assert "dvc.lock" in git(project, "ls-files")  # the version task committed it
    assert s3_client.list_objects_v2(Bucket=BUCKET, Prefix="e2e/dvc/")["KeyCount"] > 0
    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", str(project), str(clone))
    run_ok([str(BIN / "sdpo"), "version", "--pipeline", "tiny-random", "--pull"], shell, clone)
    assert (clone / "runs/tiny-random/final/sdpo_model.json").is_file()

    sets = [a for o in [*TINY, "tracking.backend=none"] for a in ("--set", o)]
    run_ok([str(BIN / "sdpo"), "evaluate", "--pipeline", "tiny-random", *sets], shell, clone)
    fresh = json.loads((clone / "runs/tiny-random/eval/eval.json").read_text())
    original = json.loads((project / "runs/tiny-random/eval/eval.json").read_text())
    # same weights, same seeds: the clone reproduces the flow's evaluation exactly
    assert fresh["steps"]["1"]["trained"]["mean"] == original["steps"]["1"]["trained"]["mean"]


def test_stack_down_stops_every_process(stack, user_env):
    project, _ = stack
    state = json.loads((project / ".sdpo-stack/stack.json").read_text())
    # `up` ran with SIGINT ignored (the fixture); what it started must not have inherited that
    ignoring = [name for name, proc in state["processes"].items() if _ignores_sigint(proc["pid"])]
    assert ignoring == [], f"{ignoring} ignore SIGINT: `stack down` cannot stop them by it"
    down = run_ok([str(BIN / "sdpo"), "stack", "down"], user_env, project, timeout=180)
    print(down.stderr)  # the stop times, for `pytest -rP`
    stops = re.findall(r"^(\w+): stopped \((\w+), ([\d.]+) s\)$", down.stderr, re.MULTILINE)
    assert [(name, sig) for name, sig, _ in stops] == [
        ("serve", "SIGINT"),
        ("mlflow", "SIGINT"),
        ("prefect", "SIGINT"),
    ], down.stderr  # serve first, each by SIGINT
    assert max(float(seconds) for *_, seconds in stops) < 15, down.stderr  # not the 30 s fallback
    for proc in state["processes"].values():
        assert (
            not Path(f"/proc/{proc['pid']}").exists() or "Z" in Path(f"/proc/{proc['pid']}/stat").read_text()
        )
    status = subprocess.run(
        [str(BIN / "sdpo"), "stack", "status"], env=user_env, cwd=project, capture_output=True
    )
    assert status.returncode == 1
