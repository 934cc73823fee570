"""Register a trained model in the MLflow model registry and move its aliases.

The model is an MLflow pyfunc (``sdpo_core/tracking/pyfunc.py``, logged as code): its artifacts are
the trained weights (``RUN_DIR/final``) and, when the base model is a local directory (the embedded
default), the base model itself, so the registered model is self-contained; a hub base is referenced
by id. The version is tagged with the evaluation numbers (``eval.*``, see ``sdpo_core.tracking.promotion``)
plus whatever provenance the caller passes (git commit, ``dvc.lock`` hashes, the parent run).

Alias ``champion`` moves to the new version only when it beats the current champion (for a first
version: the base model) by ``register.rule`` (docs/orchestration.md), paired sample by sample when
the evaluation re-evaluated the champion or the eval sets match (``promotion``); otherwise the new
version gets ``challenger``. The registration run keeps ``eval.json`` (``champion.EVAL_ARTIFACT``)
for the paired rule of later versions, and the alias change is recorded on the version
(``champion.record_alias``). An invalid or missing ``eval.json`` stops everything before MLflow is touched, and
an unreachable tracking server before anything is logged.

Never half-way: a version is tagged ``sdpo.register_key`` (a hash of the trained weights and the
parent run) when it is created and ``sdpo.complete`` after its alias is set, as the last step. A
registration that failed in between (the server went away) leaves an incomplete version; the next
attempt with the same weights and parent run (the flow's register task retries) completes that
version instead of adding one, and removes any duplicate of it.

Usage::

    reg = register_model(cfg, "runs/digits-tiny", parent_run_id=run_id, tags={"git.commit": sha})
    print(reg.version, reg.alias, reg.reason)
"""

from __future__ import annotations

import hashlib
import logging
import warnings
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException

from sdpo_core.config import Config, ConfigError
from sdpo_core.families.loading import read_model_meta
from sdpo_core.rundir.paths import eval_dir
from sdpo_core.tracking import promotion
from sdpo_core.tracking.champion import EVAL_ARTIFACT, current_champion, record_alias
from sdpo_core.tracking.trackers import MlflowTracker

log = logging.getLogger(__name__)
KEY_TAG, COMPLETE_TAG = "sdpo.register_key", "sdpo.complete"
MODEL_CODE = Path(__file__).with_name("pyfunc.py")
CUDA_CONSTRAINTS = Path(__file__).resolve().parents[2] / "constraints-cuda.txt"  # in a source checkout
# what the pyfunc imports when it loads (sdpo_core itself travels as code with the model)
REQUIREMENTS = (
    "torch",
    "diffusers",
    "transformers",
    "peft",
    "safetensors",
    "accelerate",
    "pillow",
    "numpy",
    "pandas",
    "pyyaml",
    "pydantic",
    "mlflow",
)


class RegistrationError(ConfigError):
    """The run cannot be registered (no valid evaluation or no trained model); nothing was registered.
    A ConfigError so that the CLI reports it as bad input."""


@dataclass(frozen=True)
class Registration:
    name: str
    version: str
    alias: str
    reason: str
    run_id: str
    model_uri: str


def _requirements() -> list[str]:
    reqs = []
    for name in REQUIREMENTS:
        try:  # a local version suffix (+cpu) is not installable from an index: pin the release only
            reqs.append(f"{name}=={metadata.version(name).split('+')[0]}")
        except metadata.PackageNotFoundError:
            reqs.append(name)
    return reqs


def _cuda_constraints() -> list[str]:
    """``-c constraints-cuda.txt`` when registering from a checkout that has it: MLflow copies it
    into the model, so that ``pip install -r requirements.txt`` on a GPU machine gets the tested
    CUDA build of torch (PyPI's Linux wheel) and its CUDA libraries; empty otherwise."""
    path = CUDA_CONSTRAINTS
    return [f"-c {path}"] if path.is_file() else []


def _signature(cfg: Config):
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    params = ParamSchema(
        [
            ParamSpec("num_steps", "integer", cfg.sample.num_steps),
            ParamSpec("seed", "integer", 0),
            ParamSpec("eta", "double", cfg.sample.eta),
            ParamSpec("guidance_scale", "double", cfg.sample.guidance_scale),
        ]
    )
    return ModelSignature(Schema([ColSpec("string", "prompt")]), Schema([ColSpec("string", "image")]), params)


def log_pyfunc(cfg: Config, trained_dir: Path, run_id: str):
    """Log the pyfunc model into run ``run_id``; returns MLflow's ModelInfo."""
    base = cfg.model.pretrained
    artifacts = {"trained": str(trained_dir)}
    if Path(base).is_dir():  # a local base (the embedded default) travels with the model
        artifacts["base"] = str(base)
    model_config = {
        "base_model": base,
        "timestep_spacing": cfg.model.timestep_spacing,
        "num_steps": cfg.sample.num_steps,
        "seed": 0,
        "eta": cfg.sample.eta,
        "guidance_scale": cfg.sample.guidance_scale,
        # the rest of the training sampler, so the registered model samples as it was trained
        "sample": cfg.sample.model_dump(mode="json"),
        "model": cfg.model.model_dump(mode="json"),
        # where to serve, chosen at load time (load_model(uri, model_config={...})); empty: a GPU if
        # there is one, in the training dtype there, float32 on the CPU
        "device": "",
        "mixed_precision": "",
    }
    with mlflow.start_run(run_id=run_id), warnings.catch_warnings():
        # the signature is explicit; an input example would load the model and generate at logging time
        warnings.filterwarnings("ignore", message=".*input example", category=UserWarning)
        return mlflow.pyfunc.log_model(
            name="model",
            python_model=str(MODEL_CODE),
            artifacts=artifacts,
            model_config=model_config,
            signature=_signature(cfg),
            pip_requirements=_requirements() + _cuda_constraints(),
            code_paths=[str(Path(__file__).parent)],
        )


def register_key(trained_dir: Path, parent_run_id: str | None) -> str:
    """Identifies one registration across its retries: the trained files' bytes and the parent run."""
    h = hashlib.sha256(f"parent={parent_run_id}\n".encode())
    for path in sorted(p for p in trained_dir.rglob("*") if p.is_file()):
        h.update(f"{path.relative_to(trained_dir).as_posix()}\n".encode())
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:32]


def incomplete_version(client, name: str, key: str):
    """The version an earlier attempt of this registration left without its alias (None if none);
    duplicates of it (a create request retried after its answer was lost) are deleted."""
    try:
        versions = client.search_model_versions(f"name='{name}'")
    except MlflowException:  # no such registered model yet
        return None
    mine = sorted((v for v in versions if v.tags.get(KEY_TAG) == key and COMPLETE_TAG not in v.tags),
                  key=lambda v: int(v.version))
    for extra in mine[1:]:
        log.warning("deleting version %s of %s: a duplicate of half-registered version %s",
                    extra.version, name, mine[0].version)
        client.delete_model_version(name, extra.version)
    return mine[0] if mine else None


def register_model(
    cfg: Config,
    run_dir: str | Path,
    parent_run_id: str | None = None,
    tags: dict[str, str] | None = None,
    flow_run_id: str | None = None,
) -> Registration:
    """Log, register, tag and alias the model of ``run_dir`` under ``register.model_name``; the
    alias change is recorded on the version (``tracking.champion.record_alias``)."""
    # 1. Refuse before touching MLflow: a valid evaluation and a trained model must exist.
    try:
        new_eval = promotion.load_eval(eval_dir(run_dir) / "eval.json")
    except promotion.PromotionError as exc:
        raise RegistrationError(f"not registered: {exc}") from None
    trained = Path(run_dir) / "final"
    if not (trained / "sdpo_model.json").is_file():
        raise RegistrationError(f"not registered: no trained model in {trained}")
    read_model_meta(trained)
    name, rule = cfg.register.model_name, cfg.register.rule
    tracker = MlflowTracker(
        cfg.tracking.experiment, run_name=f"{cfg.pipeline}-register", parent_run_id=parent_run_id
    )
    client = mlflow.MlflowClient(tracking_uri=tracker.tracking_uri)
    status = "FAILED"
    try:
        # 2. Decide against the champion as it is before this version exists.
        champ_version, champ_eval = current_champion(client, name)
        decision = promotion.decide(rule, new_eval, champ_eval, champ_version)
        # 3. Log and register the model (or complete a version an earlier attempt left half-way);
        #    tag the version; move one alias; mark it complete.
        key = register_key(trained, parent_run_id)
        all_tags = {
            **promotion.eval_tags(new_eval),
            **(tags or {}),
            "sdpo.pipeline": cfg.pipeline,
            "sdpo.rule": rule,
            "sdpo.decision": decision.reason,
            "sdpo.previous_champion": str(champ_version),
        }
        if parent_run_id:
            all_tags["sdpo.parent_run_id"] = parent_run_id
        mv = incomplete_version(client, name, key)
        if mv is None:
            model_uri = log_pyfunc(cfg, trained, tracker.run_id).model_uri
            # the full evaluation (per-sample rewards, settings) for the paired rule of later versions
            client.log_artifact(tracker.run_id, str(eval_dir(run_dir) / "eval.json"), str(Path(EVAL_ARTIFACT).parent))
            mv = mlflow.register_model(model_uri, name, tags={**all_tags, KEY_TAG: key})
        else:
            log.warning("completing version %s of %s, left without its alias by an earlier attempt",
                        mv.version, name)
            model_uri = mv.source
            for k, v in all_tags.items():
                client.set_model_version_tag(name, mv.version, k, v)
        record_alias(client, name, mv.version, decision.alias, decision.reason, decision.margins,
                     previous=champ_version, flow_run_id=flow_run_id)
        client.set_registered_model_alias(name, decision.alias, mv.version)
        client.set_model_version_tag(name, mv.version, COMPLETE_TAG, "true")
        tracker.set_tags(
            {
                "sdpo.registered_model": name,
                "sdpo.model_version": str(mv.version),
                "sdpo.alias": decision.alias,
            }
        )
        log.info("registered %s version %s as %s: %s", name, mv.version, decision.alias, decision.reason)
        status = "FINISHED"
        return Registration(
            name, str(mv.version), decision.alias, decision.reason, tracker.run_id, model_uri
        )
    finally:
        tracker.end(status)
