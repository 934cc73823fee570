"""The identifiers that tie an MLflow run or model version to code and data: the git commit (and
whether tracked files differ from it), ``dvc.lock``'s md5 and the trained model's DVC hash.

Reads git through its CLI and ``dvc.lock`` as YAML; imports neither dvc nor mlflow, so the core
``register`` stage and the Prefect flow's version task share it.
"""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import yaml


def provenance_tags(pipeline: str, project: str | Path = ".") -> dict[str, str]:
    """``git.commit``, ``git.dirty``, ``dvc.lock_md5`` and ``dvc.model_md5`` (each only when known)."""
    project = Path(project)
    tags: dict[str, str] = {}
    head = subprocess.run(["git", "-C", str(project), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:
        tags["git.commit"] = head.stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(project), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
        ).stdout.strip()
        tags["git.dirty"] = str(bool(dirty)).lower()
    lock = project / "dvc.lock"
    if lock.is_file():
        tags["dvc.lock_md5"] = hashlib.md5(lock.read_bytes()).hexdigest()
        stage = (yaml.safe_load(lock.read_text()) or {}).get("stages", {}).get(f"train@{pipeline}", {})
        for out in stage.get("outs", []):
            if out.get("path") == f"runs/{pipeline}/final":
                tags["dvc.model_md5"] = str(out.get("md5"))
    return tags
