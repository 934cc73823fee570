"""Training as processes on a real work pool, as a user runs it (issue 20, part 3):

    prefect server start                            (a real server on 127.0.0.1)
    prefect worker start --pool cpu --type process  (a process worker; it creates the pool)
    sdpo deploy --work-pool cpu                     (sdpo/train on the pool, this checkout)
    prefect deployment run sdpo/train --param pipeline=tiny-random --param num_processes=2 ...
    cancel (as `prefect flow-run cancel ID`: state Cancelling), mid-training, after a checkpoint
    prefect deployment run sdpo/train ... --param resume=true    (resumes, completes)

The run directory lives under SDPO_RUNS_ROOT, outside the checkout; MLflow is a SQLite file. Two
CPU processes train (gloo) under `accelerate launch`. About 2 min.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from orchestration_testing import (
    BIN,
    GIT_IDENTITY,
    OFFLINE_ENV,
    TINY,
    make_project,
    prefect_server,
    run_ok,
    start,
    stop,
)

pytestmark = pytest.mark.services
PIPELINE = "tiny-random"


def _api(url: str, body: dict | None = None):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def _state(api: str, flow_run_id: str) -> str:
    return _api(f"{api}/flow_runs/{flow_run_id}")["state"]["type"]


def _logs(api: str, flow_run_id: str) -> str:
    messages, offset = [], 0
    while True:
        page = _api(f"{api}/logs/filter", {"logs": {"flow_run_id": {"any_": [flow_run_id]}},
                                            "sort": "TIMESTAMP_ASC", "limit": 200, "offset": offset})
        messages += [log["message"] for log in page]
        if len(page) < 200:
            return "\n".join(messages)
        offset += 200


def _wait(what: str, check, timeout: float):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (value := check()):
            return value
        time.sleep(0.5)
    raise TimeoutError(f"{what}: not within {timeout:.0f} s")


def _training_pids(run_dir: Path) -> list[int]:
    """The `sdpo train` processes (launcher and ranks) writing into ``run_dir``."""
    pids = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            cmd = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"sdpo_core.cli" in cmd and str(run_dir).encode() in cmd:
            pids.append(int(entry.name))
    return pids


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


@pytest.fixture
def pool(tmp_path):
    """A Prefect server, a process worker on work pool `cpu` (`prefect worker start` creates the pool)
    and the `sdpo` deployments of a fresh checkout on it; yields (project, run dir, shell env)."""
    project = make_project(tmp_path / "project")
    runs_root = tmp_path / "shared-runs"  # outside the checkout
    tracking = f"sqlite:///{project / 'mlflow.db'}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SDPO_", "PREFECT_", "MLFLOW_"))}
    env.update({**OFFLINE_ENV, **GIT_IDENTITY, "PYTHONPATH": str(project), "SDPO_RUNS_ROOT": str(runs_root),
                "MLFLOW_TRACKING_URI": tracking, "DVC_SITE_CACHE_DIR": str(project / ".dvc/tmp/site-cache"),
                "SDPO_DVC__PUSH": "false", "PREFECT_HOME": str(tmp_path / "prefect-home"),
                "PREFECT_WORKER_QUERY_SECONDS": "1", "OMP_NUM_THREADS": "1",
                "SDPO_SCHEDULE__ACTIVE": "false"})  # no cron runs of sdpo/retrain queued on the pool
    # MLflow's tables, created while the server starts (the first run would spend its first seconds on it)
    tables = subprocess.Popen([sys.executable, "-c", f"import mlflow; mlflow.MlflowClient({tracking!r}).search_experiments()"],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with prefect_server(tmp_path / "prefect-home", env) as api:
        shell = {**env, "PREFECT_API_URL": api}
        worker = start([str(BIN / "prefect"), "worker", "start", "--pool", "cpu", "--type", "process"],
                       tmp_path / "worker.log", shell, cwd=project)
        try:
            _wait("work pool cpu", lambda: _exists(f"{api}/work_pools/cpu"), 120)
            run_ok([str(BIN / "sdpo"), "deploy", "--work-pool", "cpu"], shell, project, 180)
            assert tables.wait(timeout=120) == 0
            yield project, runs_root / PIPELINE, shell
        finally:
            stop(worker, timeout=60)


def _exists(url: str) -> bool:
    try:
        _api(url)
    except urllib.error.HTTPError:
        return False
    return True


def _deployment_run(project: Path, shell: dict, *params: str) -> str:
    """`prefect deployment run sdpo/train --param pipeline=tiny-random --param num_processes=2 ...`;
    returns the flow run id."""
    cmd = [str(BIN / "prefect"), "deployment", "run", "sdpo/train", "--param", f"pipeline={PIPELINE}",
           "--param", "num_processes=2", *params]
    out = run_ok(cmd, shell, project, 120)
    return re.search(r"UUID:\s+([0-9a-f-]{36})", out.stdout).group(1)


def _final_state(api: str, flow_run_id: str, timeout: float) -> str:
    final = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")
    return _wait(f"flow run {flow_run_id} to end", lambda: (s := _state(api, flow_run_id)) in final and s, timeout)


def test_two_processes_on_a_worker_cancel_keep_a_checkpoint_and_a_new_run_resumes(pool):
    import mlflow

    from sdpo_core.training.checkpoint import latest_checkpoint

    project, run_dir, shell = pool
    api = shell["PREFECT_API_URL"]
    long = json.dumps([*TINY, "train.epochs=200"])
    first = _deployment_run(project, shell, "--param", f"overrides={long}")

    # mid-training, after a complete checkpoint: cancel (what `prefect flow-run cancel ID` does)
    _wait("a first checkpoint", lambda: latest_checkpoint(run_dir), 240)
    pids = _training_pids(run_dir)
    assert len(pids) >= 3, pids  # the launcher and its two ranks
    _api(f"{api}/flow_runs/{first}/set_state", {"state": {"type": "CANCELLING", "name": "Cancelling"}})
    # the flow run lets go of its run dir (the lock file goes) once its training processes are stopped
    _wait("the cancelled run to release its run dir", lambda: not (run_dir / ".lock").exists(), 90)
    assert [p for p in pids if _alive(p)] == [], "training processes outlived the cancelled flow run"
    kept = latest_checkpoint(run_dir)
    assert kept is not None
    logs = _logs(api, first)
    assert "[train]" in logs and "epoch 0:" in logs  # the ranks' output, streamed into the run's logs
    assert "interrupted by SIGTERM: the last complete checkpoint is" in logs  # the CLI stopped cleanly

    # a new run with resume=true continues from that checkpoint, trains two more epochs, completes
    # (Prefect meanwhile loads the cancelled run's flow again for its on_cancellation hooks: ~20 s)
    done = int(kept.name.removeprefix("epoch_")) + 1
    short = json.dumps([*TINY, f"train.epochs={done + 2}"])
    second = _deployment_run(project, shell, "--param", "resume=true", "--param", f"overrides={short}")
    assert _final_state(api, second, 400) == "COMPLETED"
    assert _final_state(api, first, 120) == "CANCELLED"
    lines = (run_dir / "train_metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == list(range(done + 2))  # no epoch trained twice
    logs = _logs(api, second)
    assert f"resumed from {kept}: starting at epoch {done}" in logs

    # rank 0 logged into the flow's nested train run, one of them, with the resumed epochs only
    client = mlflow.MlflowClient(shell["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("sdpo").experiment_id
    parent = client.search_runs([experiment], f"tags.`prefect.flow_run_id` = '{second}'")[0]
    nested = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    [train] = [r for r in nested if r.data.tags["mlflow.runName"] == f"{PIPELINE}-train"]
    assert train.info.status == "FINISHED" and train.data.params["train.num_processes"] == "2"
    assert [m.step for m in client.get_metric_history(train.info.run_id, "reward/last")] == [done, done + 1]

    # DVC versions what was made outside the checkout: copied into its stage outs, committed
    assert (project / f"runs/{PIPELINE}/final/sdpo_model.json").is_file()
    assert f"train@{PIPELINE}:" in (project / "dvc.lock").read_text()
