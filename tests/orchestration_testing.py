"""Helpers for tests/flows and tests/e2e: a throwaway project checkout, free ports, local servers.

Every server binds 127.0.0.1 and is stopped by the test that started it (by its own PID).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PROJECT_FILES = (
    "pipelines.yaml",
    "dvc.yaml",
    "orchestration.yaml",
    ".dvcignore",
    ".gitignore",
    ".dvc/config",
    ".dvc/.gitignore",
)
# A tiny-random run that takes seconds: one epoch, two eval prompts, one step count.
TINY = ["train.epochs=1", "evaluate.steps=[1]", "evaluate.num_prompts=2", "evaluate.batch_size=2"]
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "DO_NOT_TRACK": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DVC_NO_ANALYTICS": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "AWS_EC2_METADATA_DISABLED": "true",
    "TOKENIZERS_PARALLELISM": "false",
}


def make_project(dest: Path) -> Path:
    """A git checkout holding what the stages read and hash (config files, dvc.yaml deps)."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in PROJECT_FILES:
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, dest / name)
    for package in ("sdpo_core", "flows"):
        shutil.copytree(ROOT / package, dest / package, ignore=shutil.ignore_patterns("__pycache__"))
    git(dest, "init", "-q")
    git(dest, "add", "-A")
    git(dest, "commit", "-q", "-m", "test project")
    return dest


GIT_IDENTITY = {
    "GIT_AUTHOR_NAME": "t",
    "GIT_AUTHOR_EMAIL": "t@localhost",
    "GIT_COMMITTER_NAME": "t",
    "GIT_COMMITTER_EMAIL": "t@localhost",
}


def git(cwd: Path, *args: str) -> str:
    env = {**os.environ, **GIT_IDENTITY}
    return subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True, text=True).stdout


def run_ok(args: list[str], env: dict[str, str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """A user's command; its exit status must be 0 (else its output's tail in the assertion)."""
    proc = subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (
        f"{' '.join(args)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )
    return proc


def exports(stdout: str) -> dict[str, str]:
    """The ``export NAME=value`` lines of `sdpo stack up` as a dict."""
    lines = [line.removeprefix("export ") for line in stdout.splitlines() if line.startswith("export ")]
    return dict(line.split("=", 1) for line in lines)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process for {url} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status < 500:
                    return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f} s")


# exec'd in front of every server: SIGINT back to its default action. A test run started as a background
# job without job control (`make test &` in a script, `nohup ... &`) has SIGINT ignored, every process it
# starts inherits that, and a Prefect worker then ignores stop()'s SIGINT (its handler re-sends the signal
# to itself under the inherited disposition): the fixture waited 60 s and killed it. Exec keeps SIG_DFL.
_SIGINT_DEFAULT = ("import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
                   "os.execvp(sys.argv[1], sys.argv[1:])")


def start(args: list[str], log: Path, env: dict[str, str], cwd: Path | None = None) -> subprocess.Popen:
    """A server in its own session (so stop() reaches its children too) that stops on SIGINT whatever
    this process inherited, output to ``log``."""
    with open(log, "ab") as fh:
        return subprocess.Popen(
            [sys.executable, "-c", _SIGINT_DEFAULT, *map(str, args)], stdout=fh, stderr=subprocess.STDOUT,
            env=env, cwd=cwd, start_new_session=True
        )


def stop(proc: subprocess.Popen, timeout: float = 15) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


# moto's S3 server takes any credentials; these keep boto3 and s3fs from looking for real ones
AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@contextmanager
def versioned_bucket(bucket: str, log: Path, monkeypatch) -> Iterator:
    """A boto3 client of a fresh moto S3 server on 127.0.0.1 holding ``bucket`` with versioning on;
    AWS_* (endpoint included) are set through ``monkeypatch`` so boto3 and s3fs in this process use it."""
    import boto3

    port = free_port()
    proc = start([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], log, {**os.environ, **AWS})
    try:
        wait_http(f"http://127.0.0.1:{port}", 30, proc)
        for key, value in {**AWS, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}.items():
            monkeypatch.setenv(key, value)
        client = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}")
        client.create_bucket(Bucket=bucket)
        client.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
        yield client
    finally:
        stop(proc)


@contextmanager
def prefect_server(home: Path, env: dict[str, str]) -> Iterator[str]:
    """A real `prefect server start` on 127.0.0.1 with its own PREFECT_HOME (SQLite database there);
    yields its API URL; stopped (SIGINT to its session) afterwards."""
    port = free_port()
    home.mkdir(parents=True, exist_ok=True)
    proc = start([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                 home / "server.log", {**env, "PREFECT_HOME": str(home)})
    try:
        wait_http(f"http://127.0.0.1:{port}/api/health", 120, proc)
        yield f"http://127.0.0.1:{port}/api"
    finally:
        stop(proc)
