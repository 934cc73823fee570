"""Security basics: credentials never reach logs, MLflow, the run dir or Prefect; servers bind the
loopback interface by default; nothing unpickles a file from a user path."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest
from orchestration_testing import OFFLINE_ENV, ROOT, TINY, free_port, make_project, start, stop, wait_http

import flows  # noqa: F401  (sets PREFECT_LOGGING_EXTRA_LOGGERS before prefect is imported)

# recognisable fake values: any of them found anywhere written by a run is a leak
SECRETS = {
    "AWS_ACCESS_KEY_ID": "AKIASDPOFAKEKEY12345",
    "AWS_SECRET_ACCESS_KEY": "sdpo-fake-aws-secret-3f9c1e",
    "MLFLOW_TRACKING_TOKEN": "sdpo-fake-mlflow-token-8d2a7b",
    "MLFLOW_TRACKING_PASSWORD": "sdpo-fake-mlflow-password-51c4",
}


@pytest.mark.services
def test_no_credential_in_logs_mlflow_run_dir_or_prefect(tmp_path, monkeypatch, capfd):
    """Fault: AWS and MLflow credentials are set in the environment of a flow run (tiny-random,
    all stages, registration). Must hold: none of their values appears in any file the run wrote
    (MLflow's database and artifacts, RUN_DIR/config.yaml, DVC cache and remote, dvc.lock), in the
    Prefect flow-run logs or parameters, or in the process's own output."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogWorker
    from prefect.testing.utilities import prefect_test_harness

    from flows.sdpo_flow import sdpo

    project = make_project(tmp_path / "project")
    monkeypatch.chdir(project)
    for key, value in {**OFFLINE_ENV, **SECRETS, "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}",
                       "DVC_SITE_CACHE_DIR": str(project / ".dvc/tmp/site-cache")}.items():
        monkeypatch.setenv(key, value)
    for key in [k for k in os.environ if k.startswith("SDPO_")]:
        monkeypatch.delenv(key)
    with prefect_test_harness(server_startup_timeout=60):
        state = sdpo("tiny-random", TINY, return_state=True)
        assert state.is_completed(), state.message
        APILogWorker.drain_all(timeout=30)
        with get_client(sync_client=True) as client:
            flt = LogFilter(flow_run_id=LogFilterFlowRunId(any_=[state.state_details.flow_run_id]))
            prefect_text = "\n".join(log.message for log in client.read_logs(log_filter=flt, limit=200))
            prefect_text += repr(client.read_flow_run(state.state_details.flow_run_id).parameters)
    assert "epoch 0:" in prefect_text  # the logs were really read
    written = [p for p in project.rglob("*") if p.is_file() and ".git" not in p.relative_to(project).parts[:1]]
    assert (project / "mlflow.db").is_file() and (project / "runs/tiny-random/config.yaml").is_file()
    out, err = capfd.readouterr()
    for name, secret in SECRETS.items():
        assert secret not in prefect_text, f"{name} in the Prefect logs"
        assert secret not in out + err, f"{name} in the output"
        leaks = [str(p) for p in written if secret.encode() in p.read_bytes()]
        assert not leaks, f"{name} written to {leaks}"


def _listen_addresses(port: int) -> set[str]:
    """Local addresses in LISTEN state on ``port`` (from /proc/net/tcp and tcp6)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, _, state = line.split()[1:4]
            addr, hex_port = local.split(":")
            if int(hex_port, 16) == port and state == "0A":  # 0A = LISTEN
                found.add(addr)
    return found


@pytest.mark.services
def test_reward_server_binds_loopback_by_default(tmp_path):
    """Fault guarded against: a server reachable from the network without being asked to be. Must
    hold: `sdpo reward-server` without --host listens on 127.0.0.1 only (no 0.0.0.0 / ::)."""
    port = free_port()
    env = {**os.environ, **OFFLINE_ENV, "PYTHONPATH": str(ROOT)}
    proc = start([sys.executable, "-m", "sdpo_core.cli", "reward-server", "--reward", "jpeg_compressibility",
                  "--port", str(port), "--device", "cpu"], tmp_path / "server.log", env)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", 60, proc)
        assert _listen_addresses(port) == {"0100007F"}  # 127.0.0.1, little-endian hex
    finally:
        stop(proc)


def test_stack_servers_bind_loopback_by_default(tmp_path, monkeypatch):
    """Must hold: with the repo's orchestration.yaml and no overrides, `sdpo stack up` starts the
    Prefect and MLflow servers with --host 127.0.0.1 (the argument lists it builds)."""
    from flows import stack
    from flows.settings import load_settings

    for key in [k for k in os.environ if k.startswith("SDPO_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("SDPO_ORCHESTRATION_FILE", str(ROOT / "orchestration.yaml"))
    started: dict[str, list[str]] = {}
    monkeypatch.setattr(stack, "_start", lambda name, args, *rest: started.setdefault(name, args) and {})
    settings = load_settings()
    stack._start_prefect(settings, {})
    stack._start_mlflow(settings, {})
    for name in ("prefect", "mlflow"):
        args = started[name]
        assert args[args.index("--host") + 1] == "127.0.0.1", (name, args)


UNSAFE_LOADS = [
    (re.compile(r"torch\.load\((?![^)]*weights_only=True)"), "torch.load without weights_only=True"),
    (re.compile(r"\bpickle\.loads?\(|\bcloudpickle\b|\bdill\b|\bjoblib\b"), "pickle / joblib / dill"),
    (re.compile(r"allow_pickle\s*=\s*True"), "numpy allow_pickle=True"),
    (re.compile(r"yaml\.load\((?![^)]*SafeLoader)|yaml\.unsafe_load|yaml\.full_load"), "unsafe yaml load"),
]


def test_nothing_unpickles_a_user_file():
    """Must hold: no code of the package, flows or benchmarks deserialises with pickle: torch.load
    always with weights_only=True, no pickle/joblib/dill loads, no numpy allow_pickle, safe YAML."""
    offences = []
    for path in sorted([*ROOT.glob("sdpo_core/**/*.py"), *ROOT.glob("flows/**/*.py"), *ROOT.glob("bench/**/*.py")]):
        text = path.read_text(encoding="utf-8")
        for pattern, what in UNSAFE_LOADS:
            for m in pattern.finditer(text):
                line = text.count("\n", 0, m.start()) + 1
                offences.append(f"{path.relative_to(ROOT)}:{line}: {what}")
    assert not offences, "\n".join(offences)
