"""The `register` stage: log RUN_DIR's trained model to the MLflow registry, tagged with its
evaluation and its provenance (git commit, ``dvc.lock`` hashes), and move ``champion`` only when it
beats the current champion by ``register.rule`` (else ``challenger``).

The ``sdpo register`` command and the Prefect flow's register task both call :func:`register_stage`.
mlflow is imported only when a model is registered.

Usage::

    reg = register_stage(cfg, "runs/digits-tiny")
    print(reg.version, reg.alias, reg.reason)
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sdpo_core.config import Config
from sdpo_core.prompts import PromptError, load_split
from sdpo_core.rundir.paths import prompts_dir
from sdpo_core.tracking.inputs import input_tags
from sdpo_core.tracking.provenance import provenance_tags
from sdpo_core.tracking.trackers import mlflow_installed, resolve_uri


def register_stage(
    cfg: Config,
    run_dir: str | Path,
    parent_run_id: str | None = None,
    tags: dict[str, str] | None = None,
    project: str | Path = ".",
    flow_run_id: str | None = None,
):
    """Register the model of ``run_dir``; ``tags`` are added to (and win over) the provenance tags of
    the checkout at ``project``. Returns ``tracking.registry.Registration``; raises
    ``RegistrationError`` (a ConfigError) before touching MLflow when there is no valid evaluation
    or trained model."""
    from sdpo_core.tracking.registry import register_model

    all_tags = {**provenance_tags(cfg.pipeline, project), **_inputs(cfg, run_dir), **(tags or {})}
    return register_model(cfg, run_dir, parent_run_id=parent_run_id, tags=all_tags, flow_run_id=flow_run_id)


def _inputs(cfg: Config, run_dir: str | Path) -> dict[str, str]:
    """The input hashes (``tracking.inputs``) of ``run_dir``; none when its prompt split is gone."""
    try:
        return input_tags(cfg, load_split(prompts_dir(run_dir)).manifest)
    except PromptError:
        return {}


@contextmanager
def champion_weights(cfg: Config, parent: str | Path | None = None) -> Iterator[tuple[str, str, Path] | None]:
    """(model name, version, trained weights dir) of ``register.model_name@champion``, downloaded
    (into a temporary folder under ``parent``, default the system's) for the length of the ``with``
    block; None when tracking is off (or falls back to none, mlflow not being installed) or there is
    no champion."""
    if cfg.tracking.backend != "mlflow" or not mlflow_installed():
        yield None
        return
    import mlflow

    from sdpo_core.tracking.champion import download_champion

    name = cfg.register.model_name
    with tempfile.TemporaryDirectory(prefix=".sdpo-champion-", dir=parent) as tmp:
        found = download_champion(mlflow.MlflowClient(tracking_uri=resolve_uri()), name, tmp)
        yield None if found is None else (name, *found)
