"""Tracking and registry faults against a real ``mlflow server`` on 127.0.0.1: down at start,
killed mid-training (back during the run, or only after it ended), and killed between creating a
model version and setting its alias. One server per module; each test restores it.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fault_servers import FailingProxy, MlflowServer
from orchestration_testing import OFFLINE_ENV, ROOT, free_port

pytestmark = pytest.mark.services


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = MlflowServer(tmp_path_factory.mktemp("mlflow"))
    srv.start()
    yield srv
    srv.kill()


@pytest.fixture
def use_server(server, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
    if server.proc.poll() is not None:  # a failed test left it down
        server.start()
    return server


def _client(url: str):
    import mlflow

    return mlflow.MlflowClient(tracking_uri=url)


def _train(cfg, run_dir: Path, hook) -> object:
    """Three epochs of tiny-random logged to a new MLflow run; ``hook(trainer)`` after each update."""
    from sdpo_core.tracking.trackers import MlflowTracker
    from sdpo_core.training.callbacks import TrainerCallback
    from sdpo_core.training.trainer import Trainer

    class Hook(TrainerCallback):
        def on_optimizer_step(self, trainer) -> None:
            hook(trainer)

    tracker = MlflowTracker("faults", run_name="train")
    Trainer(cfg, run_dir, tracker=tracker, callbacks=[Hook()]).run()
    tracker.end("FINISHED")
    return tracker


def _steps(client, run_id: str, key: str = "reward/last") -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def test_unreachable_server_at_start_stops_train_in_one_line_before_any_model(tmp_path):
    """Fault: MLFLOW_TRACKING_URI names a port where nothing listens. Must hold: `sdpo train` exits 2
    at once with one line naming the URI and what was tried, no traceback, and nothing built or
    written (the tiny base model is not built, the run dir not created)."""
    uri = f"http://127.0.0.1:{free_port()}"
    env = {**os.environ, **OFFLINE_ENV, "MLFLOW_TRACKING_URI": uri, "PYTHONPATH": str(ROOT)}
    args = [sys.executable, "-m", "sdpo_core.cli", "train", "--pipeline", "tiny-random",
            "--pipelines", str(ROOT / "pipelines.yaml"), "--run-dir", "run"]
    t0 = time.monotonic()
    proc = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - t0
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert f"MLflow tracking server {uri} is not reachable" in errors[0] and f"GET {uri}/health" in errors[0]
    assert not (tmp_path / "runs").exists() and not (tmp_path / "run").exists()  # base not built
    assert elapsed < 60, f"took {elapsed:.0f} s (imports included)"


def test_server_that_accepts_but_never_answers_is_reported_within_ten_seconds():
    """Fault: a host that accepts connections and never answers (a hung server, a black hole).
    Must hold: the start-up check gives up within ~10 s (two 5 s tries) naming the URI."""
    from sdpo_core.tracking.trackers import TrackingUnavailable, check_reachable

    with socket.socket() as sock:  # listening, never accepting: connect succeeds, no reply ever
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        uri = f"http://127.0.0.1:{sock.getsockname()[1]}"
        t0 = time.monotonic()
        with pytest.raises(TrackingUnavailable, match="timed out|timeout") as exc:
            check_reachable(uri)
        assert time.monotonic() - t0 < 13
    assert uri in str(exc.value)


def test_server_killed_mid_training_gets_the_metrics_when_it_is_back(use_server, tiny_cfg, tmp_path):
    """Fault: the server is SIGKILLed at the first optimizer step and started again (same port and
    store) during epoch 1. Must hold: training completes; epoch 0's metrics, which could not be sent,
    reach the run at epoch 1; every epoch is in the run and in train_metrics.jsonl; nothing pending."""
    run_dir = tmp_path / "run"
    events: list[str] = []

    def hook(trainer) -> None:
        if trainer.global_step == 1:
            use_server.kill()
            events.append("killed")
        elif events == ["killed"] and (run_dir / "train_metrics.jsonl").exists():  # epoch 0 logged
            use_server.start()
            events.append("restarted")

    tracker = _train(tiny_cfg("train.epochs=3", "tracking.backend=mlflow"), run_dir, hook)
    assert events == ["killed", "restarted"]
    client = _client(use_server.url)
    assert _steps(client, tracker.run_id) == [0, 1, 2]
    lines = (run_dir / "train_metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [0, 1, 2]
    first = json.loads(lines[0])["reward/last"]
    assert client.get_metric_history(tracker.run_id, "reward/last")[0].value == pytest.approx(first)
    journal = json.loads((run_dir / "tracking_sync.json").read_text())
    assert journal["logged_steps"] == [0, 1, 2] and journal["pending"]["metrics"] == []
    assert client.get_run(tracker.run_id).info.status == "FINISHED"


def test_run_that_ended_offline_is_sent_by_sdpo_sync(use_server, tiny_cfg, tmp_path, capsys):
    """Fault: the server is SIGKILLed at the first optimizer step and only comes back after training
    ended. Must hold: training completes offline; the run dir records the run id and what is pending;
    `sdpo sync --run-dir` then sends every epoch's metrics, the config artifact and the final status;
    a second sync sends nothing."""
    from sdpo_core.cli import main

    run_dir = tmp_path / "run"

    def hook(trainer) -> None:
        if trainer.global_step == 1:
            use_server.kill()

    tracker = _train(tiny_cfg("train.epochs=3", "tracking.backend=mlflow"), run_dir, hook)
    journal = json.loads((run_dir / "tracking_sync.json").read_text())
    assert journal["run_id"] == tracker.run_id and journal["tracking_uri"] == use_server.url
    assert [step for step, _ in journal["pending"]["metrics"]] == [0, 1, 2]
    assert journal["pending"]["status"] == "FINISHED" and len(journal["pending"]["artifacts"]) == 1

    use_server.start()
    client = _client(use_server.url)
    assert client.get_run(tracker.run_id).info.status == "RUNNING" and _steps(client, tracker.run_id) == []
    assert main(["sync", "--run-dir", str(run_dir)]) == 0
    assert "sent epochs [0, 1, 2], 1 artifact(s); complete" in capsys.readouterr().out
    assert _steps(client, tracker.run_id) == [0, 1, 2]
    assert client.get_run(tracker.run_id).info.status == "FINISHED"
    assert "config.yaml" in {a.path for a in client.list_artifacts(tracker.run_id)}
    assert main(["sync", "--run-dir", str(run_dir)]) == 0
    assert "sent epochs [], 0 artifact(s); complete" in capsys.readouterr().out
    assert _steps(client, tracker.run_id) == [0, 1, 2]


def _eval_json(run_dir: Path) -> None:
    entry = {"base": {"mean": 0.1, "ci95": [0.05, 0.15], "n": 4},
             "trained": {"mean": 0.5, "ci95": [0.45, 0.55], "n": 4},
             "gain": 0.4, "gain_ci95": [0.3, 0.5], "win_rate": 1.0}
    (run_dir / "eval").mkdir(parents=True)
    (run_dir / "eval" / "eval.json").write_text(
        json.dumps({"pipeline": "tiny-random", "reward": "jpeg_compressibility", "steps": {"1": entry}})
    )


def test_registration_cut_before_the_alias_is_completed_on_retry(use_server, tiny_cfg, tmp_path, monkeypatch):
    """Fault: the registry goes away (a proxy in front of the real server answers 502 to everything)
    right when the alias of a just-created model version is set. Must hold: that attempt fails and
    leaves one version without alias; the retry (same weights, same parent run) completes that
    version instead of adding one: exactly one version, with its tags, alias and complete mark."""
    from sdpo_core.tracking.registry import COMPLETE_TAG, register_model
    from sdpo_core.training.trainer import Trainer

    cfg = tiny_cfg("train.epochs=1", "tracking.backend=mlflow", "register.model_name=faults-half")
    run_dir = tmp_path / "run"
    Trainer(cfg, run_dir).run()
    _eval_json(run_dir)
    proxy = FailingProxy(use_server.url, lambda m, path: m == "POST" and path.endswith("registered-models/alias"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", proxy.url)
    try:
        with pytest.raises(Exception):  # noqa: B017  (MLflow's error after its retries of the 502)
            register_model(cfg, run_dir, parent_run_id=None)
        assert proxy.tripped == 1
        client = _client(use_server.url)
        half = client.search_model_versions("name='faults-half'")
        assert [v.version for v in half] == ["1"] and not half[0].aliases and COMPLETE_TAG not in half[0].tags

        proxy.restore()  # the retry
        reg = register_model(cfg, run_dir, parent_run_id=None)
    finally:
        proxy.close()
    versions = client.search_model_versions("name='faults-half'")
    assert [v.version for v in versions] == ["1"] and (reg.version, reg.alias) == ("1", "champion")
    mv = client.get_model_version_by_alias("faults-half", "champion")
    assert mv.version == "1" and mv.tags[COMPLETE_TAG] == "true" and mv.tags["eval.1.trained_mean"] == "0.5"
    assert "beats the base model" in mv.tags["sdpo.decision"]


def test_without_mlflow_installed_sdpo_run_falls_back_to_no_tracking_in_one_line(tmp_path):
    """Fault: a plain `pip install .` (no `pipeline` extra): importing mlflow fails for real (an
    `mlflow` package first on the path whose import raises ImportError). Must hold: `sdpo run`
    completes with tracking off, saying so in one log line that names the extra to install, and
    writes no MLflow store."""
    shim = tmp_path / "shim" / "mlflow"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError(\"No module named 'mlflow'\")\n")
    env = {**os.environ, **OFFLINE_ENV, "PYTHONPATH": f"{shim.parent}{os.pathsep}{ROOT}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    args = [sys.executable, "-m", "sdpo_core.cli", "run", "--pipeline", "tiny-random",
            "--pipelines", str(ROOT / "pipelines.yaml"), "--run-dir", "run",
            "--set", "train.epochs=1", "--set", "evaluate.steps=[1]", "--set", "evaluate.num_prompts=2",
            "--set", "evaluate.batch_size=2"]
    proc = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    said = [line for line in proc.stderr.splitlines() if "mlflow" in line.lower()]
    assert len(said) == 1 and "falls back to none" in said[0] and "pip install '.[pipeline]'" in said[0], said
    assert (tmp_path / "run" / "eval" / "eval.json").is_file()
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()
