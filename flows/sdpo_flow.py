"""The `sdpo` Prefect flow: prepare -> (base) -> train -> evaluate -> version -> register.

Each task is a thin wrapper over the ``sdpo_core`` function the CLI calls, passing paths and run
ids only. One flow run = one MLflow parent run (a nested run per stage) = one ``dvc.lock`` state.
Only the network steps (version: dvc push, inside ``versioning.push``; register: MLflow) retry; a retried flow run resumes
training from its last checkpoint, a new one refuses a run directory holding an earlier run's training
unless ``resume`` or ``fresh`` says what to do with it (``flows/rundirs.py``). Training with more than one
process runs ``sdpo train`` under ``accelerate launch`` (``flows/launch.py``). Run it directly::

    python -c "from flows.sdpo_flow import sdpo; sdpo('tiny-random', ['train.epochs=1'])"

or through the deployments (`sdpo stack up`, then `prefect deployment run sdpo/train`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import mlflow
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from prefect.states import Completed, Failed, State
from pydantic import BaseModel

from flows import launch, rundirs, versioning
from flows.settings import load_settings
from sdpo_core import stages
from sdpo_core.config import Config, ConfigError, load_config
from sdpo_core.evaluation.evaluate import format_table
from sdpo_core.prompts import load_split
from sdpo_core.rundir.lock import held_fd, launch_env, run_lock
from sdpo_core.rundir.outputs import export_train_metrics
from sdpo_core.rundir.paths import default_run_dir, eval_dir, prompts_dir
from sdpo_core.tracking.champion import version_with_inputs
from sdpo_core.tracking.inputs import INPUTS_TAG, input_tags
from sdpo_core.tracking.provenance import provenance_tags
from sdpo_core.tracking.register import register_stage
from sdpo_core.tracking.runs import stage_tracker, tracked
from sdpo_core.tracking.trackers import make_tracker, resolve_uri


class Job(BaseModel):
    """What every task needs to find its inputs: the pipeline, its overrides, where things are."""

    pipeline: str
    overrides: list[str] = []
    pipelines_file: str = "pipelines.yaml"
    skip_unchanged: bool = False  # end without training when a registered version has the same inputs
    location: str = ""  # the run directory (flows/rundirs.py); "": runs/<pipeline>
    num_processes: int | None = None  # training processes, resolved (recorded as train.num_processes)
    start: rundirs.StartMode = "new"  # what training does with an earlier run's outputs (rundirs.start_mode)

    @property
    def all_overrides(self) -> list[str]:
        """The overrides with the resolved process count: what the config and a launched `sdpo train` see."""
        return [*self.overrides, *([f"train.num_processes={self.num_processes}"] if self.num_processes else [])]

    def config(self) -> Config:
        return load_config(self.pipeline, self.all_overrides, Path(self.pipelines_file))

    @property
    def run_dir(self) -> Path:
        return Path(self.location) if self.location else default_run_dir(self.pipeline)


def _route_sdpo_core_logs() -> None:
    """sdpo_core's records into the run logs. PREFECT_LOGGING_EXTRA_LOGGERS does this when it is set
    before prefect is first imported (flows/__init__.py); this covers a process that imported prefect
    earlier. INFO, since Prefect's root logger stays at WARNING."""
    target = logging.getLogger("sdpo_core")
    for handler in logging.getLogger("prefect.extra").handlers:
        if handler not in target.handlers:
            target.addHandler(handler)
    target.setLevel(logging.INFO)


def _not_a_config_error(task, task_run, state) -> bool:
    """Retry condition: a wrong config or an invalid evaluation fails the same way every time."""
    try:
        state.result()
    except ConfigError:
        return False
    except Exception:
        return True
    return False


# ---------------------------------------------------------------------------------------- tasks
# One task per stage of ``stages.STAGES``, called as ``task(job, parent_run_id, done)`` where
# ``done`` maps the stages run so far (and "version") to their results. A stage without a task of
# its own here runs through ``stage_task``: its `sdpo` command inside a nested tracker run.
@task(name="prepare", cache_policy=NO_CACHE)
def prepare_task(job: Job, parent_run_id: str | None, done: dict) -> str:
    cfg = job.config()
    with tracked(stage_tracker(cfg, "prepare", parent_run_id)) as tracker:
        split = stages.prepare_stage(cfg, job.run_dir)
        tracker.log_metrics({"prompts/train": len(split.train), "prompts/eval": len(split.eval)})
        tracker.log_artifact(prompts_dir(job.run_dir) / "manifest.json")
    get_run_logger().info("prompts: %d train / %d eval", len(split.train), len(split.eval))
    return str(prompts_dir(job.run_dir))


@task(name="base", cache_policy=NO_CACHE)
def base_task(job: Job, parent_run_id: str | None, done: dict) -> str:
    cfg = job.config()
    with tracked(stage_tracker(cfg, "base", parent_run_id)) as tracker:
        base = stages.base_stage(cfg)
        tracker.set_tags({"sdpo.base_model": base})
    return base


@task(name="train", cache_policy=NO_CACHE)
def train_task(job: Job, parent_run_id: str | None, done: dict) -> str:
    """Train as ``job.start`` says (resume, or clear first); one process here, more under
    ``accelerate launch`` (flows/launch.py), rank 0 logging into this task's MLflow run."""
    cfg = job.config()
    resume = rundirs.begin_training(job.run_dir, job.start, flow_run.id, flow_run.name, flow_run.run_count,
                                    get_run_logger())
    with tracked(stage_tracker(cfg, "train", parent_run_id)) as tracker:
        if job.num_processes in (None, 1):
            final = stages.train_stage(cfg, job.run_dir, resume=resume, tracker=tracker)
        else:
            final = _train_processes(job, cfg, resume, tracker.run_id)
        tracker.log_artifact(export_train_metrics(job.run_dir))
    return str(final)


def _train_processes(job: Job, cfg: Config, resume: bool, tracking_run_id: str | None) -> Path:
    """``sdpo train`` under ``accelerate launch`` with ``job.num_processes`` processes, holding this
    flow's lock of the run directory (rank 0 writes under it)."""
    settings, logger = load_settings().launch, get_run_logger()
    args = launch.train_args(job.pipeline, job.pipelines_file, job.run_dir, job.all_overrides, resume,
                             tracking_run_id)
    cmd = launch.launch_command(job.num_processes, launch.free_port(), cfg.model.mixed_precision, args,
                                settings.accelerate_config)
    logger.info("training with %d processes: %s", job.num_processes, " ".join(cmd[1:]))
    fd = held_fd(job.run_dir)
    launch.run_streaming(cmd, {**os.environ, **launch_env(job.run_dir)}, logger, settings.stop_seconds,
                         pass_fds=(fd,) if fd is not None else ())
    return job.run_dir / "final"


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate_task(job: Job, parent_run_id: str | None, done: dict) -> str:
    cfg = job.config()
    with tracked(stage_tracker(cfg, "evaluate", parent_run_id)) as tracker:
        result = stages.evaluate_stage(cfg, job.run_dir, done["train"], tracker=tracker)
    table = format_table(result)  # the CLI's table, in the run logs and as the run's artifact
    get_run_logger().info("evaluation of %s\n%s", job.pipeline, table)
    create_markdown_artifact(
        key=f"sdpo-eval-{_slug(job.pipeline)}",
        markdown=f"```\n{table}\n```",
        description=f"{job.pipeline}: mean reward per step count, base vs trained (95% CI)",
    )
    return str(eval_dir(job.run_dir) / "eval.json")


def stage_task(stage: stages.Stage):
    """The task of a declared stage that has none of its own: ``sdpo <name>`` with its defaults."""

    @task(name=stage.name, cache_policy=NO_CACHE)
    def run(job: Job, parent_run_id: str | None, done: dict) -> None:
        cfg = job.config()
        with tracked(stage_tracker(cfg, stage.name, parent_run_id)):
            stage.command(cfg, job.run_dir, stage.default_args())

    return run


@task(name="version", cache_policy=NO_CACHE)
def version_task(job: Job, executed: list[str]) -> dict[str, str]:
    """dvc commit + push of the stages this run executed (their outputs copied into the checkout's
    runs/<pipeline> first when the run dir is elsewhere); returns the provenance tags. The push
    retries ``prefect.network_retries`` times, then fails naming the remote and its endpoint."""
    settings = load_settings()
    if settings.dvc.enabled:
        versioning.copy_into_checkout(job.pipeline, job.run_dir, executed)  # a run dir outside the checkout
        versioning.commit_and_push(job.pipeline, executed, settings)
    return provenance_tags(job.pipeline)


@task(name="register", cache_policy=NO_CACHE, retry_delay_seconds=5, retry_condition_fn=_not_a_config_error)
def register_task(job: Job, parent_run_id: str | None, done: dict) -> dict[str, str]:
    reg = register_stage(job.config(), job.run_dir, parent_run_id=parent_run_id, tags=done["version"],
                         flow_run_id=flow_run.id)  # recorded with the alias change (sdpo.audit.<k>)
    create_markdown_artifact(
        key=f"sdpo-register-{_slug(job.pipeline)}",
        markdown=f"`{reg.name}` version **{reg.version}** -> alias **{reg.alias}**\n\n{reg.reason}",
        description="registration and promotion decision",
    )
    return {"name": reg.name, "version": reg.version, "alias": reg.alias, "reason": reg.reason}


STAGE_TASKS = {"prepare": prepare_task, "base": base_task, "train": train_task, "evaluate": evaluate_task,
               "register": register_task}


def task_for(stage: stages.Stage):
    return STAGE_TASKS.get(stage.name) or stage_task(stage)


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower())


# ----------------------------------------------------------------------------------------- flow
@flow(
    name="sdpo",
    flow_run_name="{pipeline}",
    description="SDPO alignment: prepare, base, train, evaluate, version (DVC), register (MLflow)",
)
def sdpo(pipeline: str = "digits-tiny", overrides: list[str] | None = None, skip_unchanged: bool = False,
         run_dir: str | None = None, resume: bool = False, fresh: bool = False,
         num_processes: int | None = None) -> dict | State:
    """``run_dir``: where to train (default ``<runs_root>/<pipeline>``, or the checkout's ``runs/<pipeline>``);
    ``resume`` / ``fresh``: continue or delete an earlier run's training found there (a new run refuses
    one otherwise; a retry of this run resumes its own); ``num_processes``: training processes on this
    machine (default ``train.num_processes``, else one per visible GPU, 1 without one)."""
    settings = load_settings()
    if settings.mlflow.tracking_uri:
        os.environ["MLFLOW_TRACKING_URI"] = settings.mlflow.tracking_uri
    _route_sdpo_core_logs()
    job = Job(pipeline=pipeline, overrides=overrides or [], pipelines_file=str(settings.pipelines_file),
              skip_unchanged=skip_unchanged,
              location=str(rundirs.run_dir_for(pipeline, run_dir, settings.runs_root)))
    # a bad pipeline name, override or process count fails the run here, with the reason
    job.num_processes = launch.resolve_num_processes(num_processes, job.config().train.num_processes)
    cfg = job.config()
    # one flow run per pipeline at a time: an overlapping one fails here (RunLockedError, naming the
    # holder) before it opens an MLflow run; a queued one would only redo the same work afterwards
    with run_lock(job.run_dir):
        try:
            job.start = rundirs.start_mode(job.run_dir, str(flow_run.id), resume=resume, fresh=fresh)
        except rundirs.RunDirRefused as exc:  # before any stage or MLflow run: the reason is the state message
            get_run_logger().error(str(exc))
            return Failed(message=str(exc))
        return _flow_body(job, cfg, pipeline)


def _flow_body(job: Job, cfg: Config, pipeline: str) -> dict | State:
    parent = make_tracker(cfg.tracking.backend, cfg.tracking.experiment, run_name=f"{pipeline}-flow")
    parent.set_tags(
        {
            "prefect.flow_run_id": str(flow_run.id),
            "prefect.flow_run_name": str(flow_run.name),
            "sdpo.pipeline": pipeline,
            "sdpo.overrides": " ".join(job.overrides),
        }
    )
    parent.log_params(cfg.to_dict())
    with tracked(parent):
        return _run_stages(job, cfg, parent)


def _unchanged_since(job: Job, cfg: Config) -> str | None:
    """The registered version made from the same inputs as this run (``tracking.inputs``), if any."""
    if not job.skip_unchanged or cfg.tracking.backend != "mlflow":
        return None
    inputs = input_tags(cfg, load_split(prompts_dir(job.run_dir)).manifest)[INPUTS_TAG]
    return version_with_inputs(mlflow.MlflowClient(tracking_uri=resolve_uri()), cfg.register.model_name, inputs)


def _run_stages(job: Job, cfg: Config, parent) -> dict | State:
    """The versioned stages that apply to ``cfg`` in declared order, DVC versioning, then the rest
    (register: the network ones, retried ``prefect.network_retries`` times). After ``prepare``,
    with ``skip_unchanged`` (the retrain deployment's default), a run whose inputs equal a registered
    version's ends Completed, nothing trained."""
    done: dict = {}
    for stage in (s for s in stages.STAGES if s.versioned and s.applies(cfg)):
        done[stage.name] = task_for(stage)(job, parent.run_id, done)
        if stage.name == "prepare" and (same := _unchanged_since(job, cfg)) is not None:
            message = (f"nothing changed since version {same} of {cfg.register.model_name} "
                       "(run with skip_unchanged=false to train anyway)")
            get_run_logger().info(message)
            parent.set_tags({"sdpo.skipped": message})
            return Completed(message=message)
    done["version"] = tags = version_task(job, list(done))  # dvc push retries itself (versioning.push)
    parent.set_tags(tags)
    summary = {
        "pipeline": job.pipeline,
        "final": done["train"],
        "eval_json": done["evaluate"],
        "parent_run_id": parent.run_id,
        **tags,
    }
    retries = load_settings().prefect.network_retries
    for stage in (s for s in stages.STAGES if not s.versioned):
        if stage.applies(cfg):
            summary.update(task_for(stage).with_options(retries=retries)(job, parent.run_id, done) or {})
        else:
            get_run_logger().warning(stage.skip_note)
    return summary
