"""The registry's champion: what the evaluation compares with, and the record of every alias move.

* :func:`current_champion`: ``NAME@champion``'s version and its evaluation, read from the
  ``eval.json`` its registration run keeps as the artifact :data:`EVAL_ARTIFACT` (per-sample rewards
  and the settings included: what the paired rule needs), else from the version's ``eval.*`` tags.
* :func:`download_champion`: the champion's trained weights, for the evaluation stage to evaluate
  them beside the new model on the new eval prompts; :func:`download_trained` those of any
  ``models:/`` URI (the warm start, ``model.init_from``).
* :func:`record_alias` tags a version with one audit entry per alias change
  (``sdpo.audit.<k>``: JSON with time, alias, previous holder, reason, margins, flow run id).

Usage::

    version, eval_dict = current_champion(client, "sdpo-digits-tiny")
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException

from sdpo_core.tracking import promotion
from sdpo_core.tracking.inputs import INPUTS_TAG

log = logging.getLogger(__name__)
EVAL_ARTIFACT = "eval/eval.json"  # in the registration run of each version
AUDIT_PREFIX = "sdpo.audit."


def champion_version(client, name: str):
    """The ModelVersion holding ``champion`` (None when there is no such model or alias)."""
    try:
        return client.get_model_version_by_alias(name, promotion.CHAMPION)
    except MlflowException:  # no such model, or no champion alias yet
        return None


def version_eval(client, mv) -> dict | None:
    """The evaluation of version ``mv``: its registration run's eval.json (checked), else its tags."""
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = client.download_artifacts(mv.run_id, EVAL_ARTIFACT, tmp)
            return promotion.load_eval(path)
    except (MlflowException, OSError, promotion.PromotionError) as exc:  # registered before it was kept
        log.info("version %s of %s: no stored eval.json (%s); reading its eval.* tags", mv.version, mv.name,
                 str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    return promotion.eval_from_tags(mv.tags)


def current_champion(client, name: str) -> tuple[str | None, dict | None]:
    """(version, eval dict) of ``name@champion``; (None, None) when there is none."""
    mv = champion_version(client, name)
    if mv is None:
        return None, None
    return str(mv.version), version_eval(client, mv)


def download_trained(model_uri: str, dest: str | Path, tracking_uri: str | None = None) -> Path:
    """The trained weights directory of the registered model ``model_uri`` (``models:/NAME/N``,
    ``models:/NAME@alias``), downloaded under ``dest``."""
    root = mlflow.artifacts.download_artifacts(model_uri, dst_path=str(dest), tracking_uri=tracking_uri,
                                               registry_uri=tracking_uri)
    # pyfunc keeps each artifact under a path of its own choosing; MLmodel says where
    artifacts = mlflow.models.Model.load(root).flavors.get("python_function", {}).get("artifacts", {})
    trained = Path(root) / artifacts.get("trained", {}).get("path", "artifacts/trained")
    if not (trained / "sdpo_model.json").is_file():
        raise MlflowException(f"{model_uri} has no trained weights (its 'trained' artifact)")
    return trained


class TrainedModelUnavailable(RuntimeError):
    """A registered model's trained weights cannot be had (no such model or version, no weights)."""


def fetch_trained(model_uri: str, dest: str | Path, tracking_uri: str | None = None) -> Path:
    """:func:`download_trained`, its MLflow and I/O failures as one error that callers outside
    ``tracking/`` can catch without importing mlflow."""
    try:
        return download_trained(model_uri, dest, tracking_uri)
    except (MlflowException, OSError) as exc:
        raise TrainedModelUnavailable(str(exc).splitlines()[0]) from None


def download_champion(client, name: str, dest: str | Path) -> tuple[str, Path] | None:
    """(version, trained weights dir) of ``name@champion`` downloaded under ``dest``; None if none."""
    mv = champion_version(client, name)
    if mv is None:
        return None
    return str(mv.version), download_trained(f"models:/{name}/{mv.version}", dest, client.tracking_uri)


def version_with_inputs(client, name: str, inputs_hash: str) -> str | None:
    """The latest complete version of ``name`` tagged ``sdpo.inputs_hash`` = ``inputs_hash`` (None if none)."""
    try:
        versions = client.search_model_versions(f"name='{name}'")
    except MlflowException:  # no such registered model yet
        return None
    same = [int(v.version) for v in versions
            if v.tags.get(INPUTS_TAG) == inputs_hash and v.tags.get("sdpo.complete") == "true"]  # registry.COMPLETE_TAG
    return str(max(same)) if same else None


def audit_entries(mv) -> list[dict]:
    """The audit entries of version ``mv``, oldest first."""
    keys = sorted((k for k in mv.tags if k.startswith(AUDIT_PREFIX)), key=lambda k: int(k.rsplit(".", 1)[1]))
    return [json.loads(mv.tags[k]) for k in keys]


def record_alias(client, name: str, version: str, alias: str, reason: str, margins: dict | None = None,
                 previous: str | None = None, flow_run_id: str | None = None, action: str = "register") -> dict:
    """Add one audit entry to ``name`` version ``version`` (before the alias moves: a retried move
    records again rather than not at all)."""
    entry = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "action": action,
        "alias": alias,
        "previous": previous,
        "reason": reason,
        "margins": {str(n): m for n, m in (margins or {}).items()},
        "flow_run_id": flow_run_id,
    }
    k = len(audit_entries(client.get_model_version(name, version)))
    client.set_model_version_tag(name, version, f"{AUDIT_PREFIX}{k}", json.dumps(entry)[:5000])
    return entry
