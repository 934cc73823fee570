"""``sdpo sync --run-dir DIR``: send to MLflow what a run could not send while its tracking
server was down (``DIR/tracking_sync.json``, written by :class:`sdpo_core.tracking.trackers.MlflowTracker`).

The file records the tracking URI, the MLflow run id, the steps already logged and everything
still pending (params, tags, metrics per epoch, artifact paths, the run's final status). Syncing
replays the pending part into the same run, in order, then rewrites the file with nothing pending;
a second sync is a no-op.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from sdpo_core.config import ConfigError
from sdpo_core.tracking.trackers import SYNC_FILE, MlflowTracker


@dataclass(frozen=True)
class SyncResult:
    run_id: str
    tracking_uri: str
    metric_steps: list[int | None]  # the epochs sent by this sync
    artifacts: int
    complete: bool  # nothing is pending any more


def read_journal(run_dir: str | Path) -> dict:
    path = Path(run_dir) / SYNC_FILE
    if not path.is_file():
        raise ConfigError(f"{path} does not exist: {run_dir} was not tracked with MLflow (nothing to sync)")
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
        state["run_id"], state["tracking_uri"], state["pending"]["metrics"]  # noqa: B018 (shape check)
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path} is not a tracking journal ({type(exc).__name__}: {exc})") from None
    return state


def sync_run_dir(run_dir: str | Path) -> SyncResult:
    """Replay ``run_dir``'s pending tracking into its MLflow run (TrackingUnavailable when the server
    still does not answer)."""
    state = read_journal(run_dir)
    experiment = "sdpo"  # set_experiment needs a name; the run already belongs to its own experiment
    tracker = MlflowTracker(experiment, tracking_uri=state["tracking_uri"], run_id=state["run_id"])
    tracker._client.get_run(state["run_id"])  # a run that does not exist there fails here, clearly
    tracker.logged_steps = list(state.get("logged_steps", []))
    tracker.pending = state["pending"]
    tracker.journal = Path(run_dir) / SYNC_FILE
    steps = [step for step, _ in tracker.pending["metrics"]]
    artifacts = len(tracker.pending["artifacts"])
    complete = tracker.flush()
    return SyncResult(state["run_id"], state["tracking_uri"], steps, artifacts, complete)
