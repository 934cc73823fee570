"""The deployments of flow `sdpo`: `train` (on demand) and the retraining one (cron from
orchestration.yaml's ``schedule``).

    python -m flows.serve          # serve both from this process (what `sdpo stack up` runs)
    sdpo deploy --work-pool gpu    # or create them on a work pool, for workers elsewhere

Either way a user starts a run with
``prefect deployment run sdpo/train --param pipeline=digits-tiny --watch``.
"""

from __future__ import annotations

import logging
from pathlib import Path

from prefect import deploy, serve
from prefect.schedules import Cron
from prefect.types.entrypoint import EntrypointType

from flows.sdpo_flow import sdpo
from flows.settings import Settings, load_settings

log = logging.getLogger(__name__)
TRAIN = "train"
TRAIN_DESCRIPTION = ("Run the whole pipeline on demand: --param pipeline=NAME [--param 'overrides=[\"k=v\"]'] "
                     "[--param num_processes=N] [--param resume=true | --param fresh=true] [--param run_dir=DIR]")


def _retrain_kwargs(settings: Settings) -> dict:
    s = settings.schedule
    return {
        "name": s.deployment,
        "schedules": [Cron(s.cron, timezone=s.timezone, active=s.active)],
        # skip a week with nothing new (same inputs as a registered version); --param skip_unchanged=false forces;
        # each week trains afresh in the same run dir (a retry of the week's run still resumes)
        "parameters": {"pipeline": s.pipeline, "overrides": s.overrides, "skip_unchanged": True, "fresh": True},
        "description": f"Scheduled retraining of {s.pipeline} ({s.cron} {s.timezone})",
    }


def build_deployments(settings: Settings) -> list:
    """Both deployments, addressed by module path: they run from any working directory."""
    module = EntrypointType.MODULE_PATH
    return [
        sdpo.to_deployment(name=TRAIN, description=TRAIN_DESCRIPTION, entrypoint_type=module),
        sdpo.to_deployment(**_retrain_kwargs(settings), entrypoint_type=module),
    ]


def deploy_to_pool(settings: Settings, work_pool: str | None = None) -> list[str]:
    """Create the deployments on a work pool; its workers fetch the code from ``prefect.source``
    (a git URL) or, by default, this checkout's path (workers on this machine)."""
    pool = work_pool or settings.prefect.work_pool
    if not pool:
        raise SystemExit("error: no work pool: pass --work-pool NAME or set prefect.work_pool")
    remote = sdpo.from_source(
        source=settings.prefect.source or str(Path.cwd()), entrypoint="flows/sdpo_flow.py:sdpo"
    )
    deployments = [
        remote.to_deployment(name=TRAIN, description=TRAIN_DESCRIPTION),
        remote.to_deployment(**_retrain_kwargs(settings)),
    ]
    if settings.prefect.source and settings.runs_root is None:
        log.warning("prefect.source is set but runs_root is not: each flow run trains in its worker's temporary "
                    "clone, whose checkpoints go with it (a retried or resumed run starts from scratch); set "
                    "runs_root (SDPO_RUNS_ROOT) to a folder on the workers")
    deploy(*deployments, work_pool_name=pool, build=False, push=False, print_next_steps_message=False)
    return [f"sdpo/{d.name} on work pool {pool}" for d in deployments]


def main() -> None:
    settings = load_settings()
    serve(*build_deployments(settings), limit=1)  # one run at a time: training takes the machine


if __name__ == "__main__":
    main()
