"""`sdpo stack up|down|status`: the local orchestration stack, in the background.

``up`` starts Prefect's own server (SQLite under ``state_dir``), an ``mlflow server`` (UI and
tracking; SQLite + local artifacts, or S3 by configuration), and ``python -m flows.serve`` (the
deployments), waits until each answers, records their PIDs in ``state_dir/stack.json`` and prints
the environment a shell needs as ``export NAME=value`` lines (``eval "$(sdpo stack up)"``).
``down`` stops them: SIGINT to ``serve`` first (SIGTERM can hang it), then the servers. A remote
Prefect API or MLflow URI in the settings replaces the local server.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from flows import LOG_ENV
from flows.settings import Settings, load_settings

BIN = Path(sys.executable).parent
STOP_ORDER = ("serve", "mlflow", "prefect")  # workers before the servers they talk to


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)  # stdout carries only the export lines


def _state_file(settings: Settings) -> Path:
    return settings.state_dir / "stack.json"


def _read_state(settings: Settings) -> dict | None:
    path = _state_file(settings)
    return json.loads(path.read_text()) if path.is_file() else None


def _alive(pid: int, marker: str) -> bool:
    """Running (not a zombie) and still the process we started (PIDs are reused)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z" and marker in cmdline


def _healthy(url: str | None) -> bool:
    if not url:
        return True
    try:
        with urllib.request.urlopen(url, timeout=3) as r:
            return r.status < 400
    except OSError:
        return False


def _wait(name: str, check, timeout: float, pid: int, marker: str, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        if not _alive(pid, marker):
            raise SystemExit(f"error: {name} exited during start-up; see {log}:\n{_tail(log)}")
        time.sleep(0.5)
    raise SystemExit(f"error: {name} did not come up within {timeout:.0f} s; see {log}")


def _tail(path: Path, n: int = 20) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:]) if path.is_file() else ""


def _sigint_default() -> None:
    """Run in the child before exec: SIGINT back to its default action. A launcher started as a
    background job of a script (`cmd &` without job control) inherits SIGINT ignored, and so would
    every process it starts; a plain Python program such as `flows.serve` then keeps ignoring it and
    `down`'s SIGINT cannot stop it (the servers install their own handlers and stop anyway)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start(name: str, args: list[str], marker: str, env: dict[str, str], settings: Settings) -> dict:
    """Start a process in its own session (its group id is its PID: `down` reaches its children)
    that stops on SIGINT whatever this process inherited (`up` starts no threads: preexec_fn is safe)."""
    log = (settings.state_dir / "logs" / f"{name}.log").resolve()
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as fh:
        proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            preexec_fn=_sigint_default,
        )
    return {"pid": proc.pid, "marker": marker, "log": str(log), "cmd": shlex.join(args)}


# ------------------------------------------------------------------------------------- servers
def _base_env(settings: Settings) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "PREFECT_HOME": str((settings.state_dir / "prefect").resolve()),  # not ~/.prefect
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "DO_NOT_TRACK": "1",
            "MLFLOW_DISABLE_TELEMETRY": "true",
        }
    )
    return env


def _start_prefect(settings: Settings, env: dict[str, str]) -> tuple[dict, str, str]:
    p = settings.prefect
    args = [str(BIN / "prefect"), "server", "start", "--host", p.host, "--port", str(p.port)]
    proc = _start("prefect", args, "prefect server start", env, settings)
    base = f"http://{p.host}:{p.port}"
    return proc, f"{base}/api", f"{base}/api/health"


def _start_mlflow(settings: Settings, env: dict[str, str]) -> tuple[dict, str, str]:
    m = settings.mlflow
    dest = settings.artifacts_destination()
    store = (
        ["--artifacts-destination", dest]
        if m.serve_artifacts
        else ["--no-serve-artifacts", "--default-artifact-root", dest]
    )
    args = [
        str(BIN / "mlflow"),
        "server",
        "--backend-store-uri",
        m.backend_store_uri,
        "--host",
        m.host,
        "--port",
        str(m.port),
        "--workers",
        str(m.workers),
        *store,
    ]
    # its job runner (GenAI scorers, not used here) adds two processes and ~12 s to every shutdown
    env = {**env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    if settings.s3.endpoint_url:
        env["MLFLOW_S3_ENDPOINT_URL"] = settings.s3.endpoint_url
    proc = _start("mlflow", args, "mlflow server", env, settings)
    base = f"http://{m.host}:{m.port}"
    return proc, base, f"{base}/health"


def shell_env(settings: Settings, prefect_api: str | None, tracking_uri: str | None) -> dict[str, str]:
    """What a shell (and the serve process) needs to talk to this stack."""
    env = dict(LOG_ENV)
    if prefect_api:
        env["PREFECT_API_URL"] = prefect_api
    if tracking_uri:
        env["MLFLOW_TRACKING_URI"] = tracking_uri
    if settings.s3.endpoint_url:  # clients reach S3 artifacts / DVC data at the same endpoint
        env["MLFLOW_S3_ENDPOINT_URL"] = settings.s3.endpoint_url
    return env


def _print_env(env: dict[str, str]) -> None:
    for key, value in env.items():
        print(f"export {key}={shlex.quote(value)}")


# ------------------------------------------------------------------------------------- commands
def up() -> int:
    settings = load_settings()
    state = _read_state(settings)
    if state and all(_alive(p["pid"], p["marker"]) for p in state["processes"].values()):
        _say(f"stack already up (sdpo stack status; state in {_state_file(settings)})")
        _print_env(state["env"])
        return 0
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    (settings.state_dir / ".gitignore").write_text("*\n")  # the state dir ignores itself
    env, procs, checks = _base_env(settings), {}, {}
    prefect_api = settings.prefect.api_url or os.environ.get("PREFECT_API_URL")
    if not settings.prefect.api_url:
        procs["prefect"], prefect_api, checks["prefect"] = _start_prefect(settings, env)
    tracking_uri = settings.stack_tracking_uri() or os.environ.get("MLFLOW_TRACKING_URI")
    if settings.mlflow.server and not settings.mlflow.tracking_uri:
        procs["mlflow"], tracking_uri, checks["mlflow"] = _start_mlflow(settings, env)
    try:  # both servers start in parallel; wait for each, then serve the deployments
        for name, url in checks.items():
            _wait(
                name,
                lambda url=url: _healthy(url),
                90,
                procs[name]["pid"],
                procs[name]["marker"],
                Path(procs[name]["log"]),
            )
            _say(f"{name}: up at {url.rsplit('/', 1)[0]}")
        out_env = shell_env(settings, prefect_api, tracking_uri)
        serve_env = {**env, **out_env, "PREFECT_RUNNER_POLL_FREQUENCY": str(settings.prefect.poll_seconds)}
        procs["serve"] = _start(
            "serve", [sys.executable, "-m", "flows.serve"], "-m flows.serve", serve_env, settings
        )
        deployment = f"{prefect_api}/deployments/name/sdpo/train"
        _wait(
            "serve",
            lambda: _healthy(deployment),
            90,
            procs["serve"]["pid"],
            "-m flows.serve",
            Path(procs["serve"]["log"]),
        )
    except BaseException:
        _stop_all(procs)
        raise
    _state_file(settings).write_text(json.dumps({"processes": procs, "env": out_env}, indent=2))
    _say(f"deployments served: sdpo/train, sdpo/{settings.schedule.deployment} ({settings.schedule.cron})")
    _say(f"Prefect UI: {prefect_api.removesuffix('/api')}   MLflow UI: {tracking_uri}")
    _print_env(out_env)
    return 0


def _stop(name: str, proc: dict, timeout: float = 30) -> None:
    """SIGINT to the process group, then SIGTERM, then SIGKILL, each after ``timeout`` seconds."""
    pid, marker, start = proc["pid"], proc["marker"], time.monotonic()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
        if not _alive(pid, marker):
            return
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and _alive(pid, marker):
            time.sleep(0.2)
        if not _alive(pid, marker):
            _say(f"{name}: stopped ({sig.name}, {time.monotonic() - start:.1f} s)")
            return


def _stop_all(procs: dict) -> None:
    for name in STOP_ORDER:
        if name in procs:
            _stop(name, procs[name])


def down() -> int:
    settings = load_settings()
    state = _read_state(settings)
    if state is None:
        _say("stack is not running (no state file)")
        return 0
    _stop_all(state["processes"])
    _state_file(settings).unlink()
    return 0


def status() -> int:
    settings = load_settings()
    state = _read_state(settings)
    if state is None:
        _say("stack is not running")
        return 1
    ok = True
    for name, proc in state["processes"].items():
        alive = _alive(proc["pid"], proc["marker"])
        ok &= alive
        _say(f"{name:8s} pid {proc['pid']:<7d} {'running' if alive else 'NOT RUNNING'}  log {proc['log']}")
    _print_env(state["env"])
    return 0 if ok else 1
