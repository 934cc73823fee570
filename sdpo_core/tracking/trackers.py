"""Experiment tracking: a small interface, a null tracker and an MLflow tracker.

The trainer and evaluation talk to ``Tracker`` only. ``MlflowTracker`` defaults to a local
SQLite file and local artifacts (``sqlite:///mlflow.db``); ``MLFLOW_TRACKING_URI`` overrides, so
the same code logs to an ``mlflow server``. mlflow is imported lazily: ``sdpo_core`` imports
without it, and ``make_tracker`` falls back to no tracking (one warning) when it is not installed.

A tracking server that cannot be reached when a run starts stops it at once
(:class:`TrackingUnavailable`, from a ``GET <uri>/health`` with a short timeout), before any
model loads. One that goes away later does not stop training: metrics, tags and artifacts that
cannot be sent are kept (in memory, and in ``RUN_DIR/tracking_sync.json`` once ``bind_run_dir``
named the run dir) and sent when the server answers again (the next ``log_metrics`` or ``end``),
or by ``sdpo sync --run-dir RUN_DIR`` after a run that ended offline (``sdpo_core.tracking.sync``).
Under ``torchrun`` / ``accelerate launch`` only global rank 0 makes an MLflow tracker (one run per
stage, whatever the number of processes); :func:`make_tracker` gives the other ranks a NullTracker.
Unless they are set, ``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` / ``_BACKOFF_FACTOR`` / ``_TIMEOUT`` are set
to 3 / 1 / 60 (MLflow's 7 / 2 / 120 retry a dead server for minutes per call).
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Protocol

from sdpo_core.rundir.ranks import is_main_process

log = logging.getLogger(__name__)
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
HEALTH_TIMEOUT = 5.0  # seconds for GET <uri>/health: a blackholed host fails within ~10 s (two tries)
SYNC_FILE = "tracking_sync.json"
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "60",
}
PIPELINE_EXTRA = "pip install '.[pipeline]'"


class TrackingUnavailable(RuntimeError):
    """The tracking server cannot be reached at the start of a run: nothing was run or written."""


def resolve_uri(tracking_uri: str | None = None) -> str:
    return tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def server_answers(uri: str, timeout: float = HEALTH_TIMEOUT) -> str | None:
    """None when ``uri`` is not an http(s) server or its ``/health`` answers; else what went wrong."""
    if not uri.startswith(("http://", "https://")):
        return None
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout):
            return None
    except urllib.error.HTTPError as exc:  # it answered: only a gateway without its backend is down
        return None if exc.code < 500 else f"GET {url} answered HTTP {exc.code}"
    except (OSError, http.client.HTTPException) as exc:
        reason = getattr(exc, "reason", exc)
        return f"GET {url} failed ({type(reason).__name__}: {reason}; timeout {timeout:.0f} s)"


def check_reachable(tracking_uri: str | None = None, tries: int = 2) -> str:
    """The tracking URI, after checking an http(s) server answers; TrackingUnavailable if not."""
    uri = resolve_uri(tracking_uri)
    for attempt in range(tries):
        problem = server_answers(uri)
        if problem is None:
            return uri
        if attempt + 1 < tries:
            time.sleep(0.5)
    raise TrackingUnavailable(
        f"MLflow tracking server {uri} is not reachable: {problem} ({tries} tries); start it "
        "(`sdpo stack up` or `mlflow server`), point MLFLOW_TRACKING_URI elsewhere, or run with "
        "--set tracking.backend=none"
    )


def mlflow_installed() -> bool:
    try:
        import mlflow  # noqa: F401
    except ImportError:
        return False
    return True


def preflight(backend: str) -> str:
    """Check tracking before a run loads anything: the backend to use (``none`` when mlflow is not
    installed, said once); TrackingUnavailable when the server does not answer."""
    if backend != "mlflow" or not is_main_process():  # under a launcher, rank 0 alone talks to MLflow
        return backend
    if not mlflow_installed():
        _warn_no_mlflow()
        return "none"
    check_reachable()
    return backend


_warned: set[str] = set()


def _warn_no_mlflow() -> None:
    if "mlflow" not in _warned:
        _warned.add("mlflow")
        log.warning("tracking.backend is 'mlflow' but mlflow is not installed: tracking falls back to none "
                    "(install it with %s)", PIPELINE_EXTRA)


class Tracker(Protocol):
    run_id: str | None

    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...
    def end(self, status: str = "FINISHED") -> None: ...
    def bind_run_dir(self, run_dir: str | Path) -> None: ...


class NullTracker:
    """Tracks nothing; keeps the last metrics in memory (handy in tests)."""

    run_id: str | None = None

    def __init__(self) -> None:
        self.metrics: list[tuple[int | None, dict[str, float]]] = []
        self.artifacts: list[str] = []

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.metrics.append((step, dict(metrics)))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.artifacts.append(str(path))

    def set_tags(self, tags: dict[str, str]) -> None:
        pass

    def end(self, status: str = "FINISHED") -> None:
        pass

    def bind_run_dir(self, run_dir: str | Path) -> None:
        pass


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


class MlflowTracker:
    """One MLflow run (nested under ``parent_run_id`` when given), tolerant of a server that goes
    away after the run was created (see the module docstring)."""

    def __init__(
        self,
        experiment: str,
        run_name: str | None = None,
        tracking_uri: str | None = None,
        parent_run_id: str | None = None,
        run_id: str | None = None,
        tags: dict[str, str] | None = None,
    ) -> None:
        for var, value in HTTP_DEFAULTS.items():
            os.environ.setdefault(var, value)
        uri = check_reachable(tracking_uri)
        import mlflow

        self._mlflow = mlflow
        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment(experiment)
        self._client = mlflow.MlflowClient(tracking_uri=uri)
        if run_id is None:
            exp = self._client.get_experiment_by_name(experiment)
            all_tags = dict(tags or {})
            if parent_run_id:
                all_tags["mlflow.parentRunId"] = parent_run_id
            if run_name:
                all_tags["mlflow.runName"] = run_name
            run = self._client.create_run(exp.experiment_id, tags=all_tags)
            run_id = run.info.run_id
        self.run_id = run_id
        self.tracking_uri = uri
        self.journal: Path | None = None
        self.pending: dict[str, Any] = {"metrics": [], "params": {}, "tags": {}, "artifacts": [], "status": None}
        self.logged_steps: list[int | None] = []
        self.offline = False
        log.info("MLflow run %s at %s", run_id, uri)

    # ------------------------------------------------------------------ the Tracker interface
    def bind_run_dir(self, run_dir: str | Path) -> None:
        """Keep what cannot be sent in ``run_dir/tracking_sync.json`` (for ``sdpo sync``)."""
        self.journal = Path(run_dir) / SYNC_FILE
        self._save()

    def log_params(self, params: dict[str, Any]) -> None:
        self.pending["params"].update({k: str(v)[:6000] for k, v in _flatten(params).items()})
        self.flush()

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.pending["metrics"].append([step, {k.replace("@", "_"): float(v) for k, v in metrics.items()}])
        self.flush()

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.pending["artifacts"].append([str(Path(path).resolve()), artifact_path])
        self.flush()

    def set_tags(self, tags: dict[str, str]) -> None:
        self.pending["tags"].update({k: str(v) for k, v in tags.items()})
        self.flush()

    def end(self, status: str = "FINISHED") -> None:
        self.pending["status"] = status
        if not self.flush():
            where = f"`sdpo sync --run-dir {self.journal.parent}` sends it" if self.journal else "it is lost"
            log.warning("MLflow run %s ended while %s was unreachable: what it could not send is kept in "
                        "%s; %s", self.run_id, self.tracking_uri, self.journal or "memory only", where)

    # ------------------------------------------------------------------ sending, offline
    def flush(self) -> bool:
        """Send everything pending, in order; False (and kept) while the server is unreachable.
        Errors of a server that answers (bad values, permissions) are raised."""
        if self.offline and server_answers(self.tracking_uri, timeout=2) is not None:
            self._save()
            return False
        try:
            self._send_pending()
        except Exception as exc:
            problem = server_answers(self.tracking_uri)
            if problem is None:
                raise
            if not self.offline:
                log.warning("MLflow at %s is unreachable (%s): training goes on; metrics are kept and "
                            "sent when it is back (%s)", self.tracking_uri, problem, type(exc).__name__)
            self.offline = True
            self._save()
            return False
        if self.offline:
            log.info("MLflow at %s is back: pending metrics sent to run %s", self.tracking_uri, self.run_id)
        self.offline = False
        self._save()
        return True

    def _send_pending(self) -> None:
        from mlflow.entities import Metric, Param

        p, client = self.pending, self._client
        items = [Param(k, v) for k, v in p["params"].items()]
        for i in range(0, len(items), 100):
            client.log_batch(self.run_id, params=items[i : i + 100])
        p["params"] = {}
        for k in list(p["tags"]):
            client.set_tag(self.run_id, k, p["tags"].pop(k))
        while p["metrics"]:
            step, values = p["metrics"][0]
            ts = int(time.time() * 1000)
            client.log_batch(self.run_id, metrics=[Metric(k, v, ts, step or 0) for k, v in values.items()])
            p["metrics"].pop(0)
            self.logged_steps.append(step)
        while p["artifacts"]:
            path, artifact_path = p["artifacts"][0]
            if Path(path).is_dir():
                client.log_artifacts(self.run_id, path, artifact_path)
            else:
                client.log_artifact(self.run_id, path, artifact_path)
            p["artifacts"].pop(0)
        if p["status"] is not None:
            client.set_terminated(self.run_id, status=p["status"])
            p["status"] = None

    def _save(self) -> None:
        if self.journal is None:
            return
        state = {"tracking_uri": self.tracking_uri, "run_id": self.run_id,
                 "logged_steps": self.logged_steps, "pending": self.pending}
        tmp = self.journal.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=1), encoding="utf-8")
        tmp.replace(self.journal)


def make_tracker(backend: str, experiment: str, run_name: str | None = None, **kwargs: Any) -> Tracker:
    """The tracker of ``backend``; under a launcher, only rank 0's talks to MLflow (the other ranks get
    a NullTracker and never touch the store: the trainer logs metrics gathered over every rank)."""
    if backend == "none" or not is_main_process():
        return NullTracker()
    if not mlflow_installed():
        _warn_no_mlflow()
        return NullTracker()
    return MlflowTracker(experiment, run_name=run_name, **kwargs)

