"""One tracking run per stage: open it named after the stage, end it FINISHED or FAILED.

    with tracked(stage_tracker(cfg, "train")) as tracker:
        train_stage(cfg, run_dir, tracker=tracker)
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from sdpo_core.config import Config
from sdpo_core.tracking.trackers import Tracker, make_tracker


def stage_tracker(cfg: Config, stage: str, parent_run_id: str | None = None, run_id: str | None = None) -> Tracker:
    """The tracker of one stage's run (``cfg.tracking``), named ``<pipeline>-<stage>``; with MLflow,
    nested under ``parent_run_id`` when given (the Prefect flow's run), or the existing run ``run_id``
    (one the flow opened for a stage it launched as processes)."""
    backend = cfg.tracking.backend
    kwargs: dict[str, str] = {}
    if backend == "mlflow":
        kwargs = {k: v for k, v in (("parent_run_id", parent_run_id), ("run_id", run_id)) if v is not None}
    return make_tracker(backend, cfg.tracking.experiment, run_name=f"{cfg.pipeline}-{stage}", **kwargs)


@contextmanager
def tracked(tracker: Tracker) -> Iterator[Tracker]:
    """``with tracked(tracker):`` the body runs inside ``tracker``'s run, which then ends FINISHED,
    or FAILED if the body raised (an exception, Ctrl-C or SIGTERM alike)."""
    status = "FAILED"
    try:
        yield tracker
        status = "FINISHED"
    finally:
        tracker.end(status)
