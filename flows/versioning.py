"""Data versioning with DVC: `dvc commit` + `dvc push` of the stages a run executed and `dvc pull`
in a fresh clone. The git / dvc.lock identifiers that tag runs and model versions are
``sdpo_core.tracking.provenance``'s.

dvc.yaml's outs are the checkout's ``runs/<pipeline>/...``. A flow run that trained elsewhere
(``runs_root``, its ``run_dir`` parameter) first copies the outputs of the stages it executed there
(:func:`copy_into_checkout`), so that `dvc commit` hashes, and `dvc push` uploads, what it made.

DVC runs as a subprocess of this interpreter (``python -m dvc``): its CLI is the stable interface,
and nothing in ``sdpo_core`` imports it. Remote credentials stay in the environment.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from flows.settings import Settings
from sdpo_core.rundir.paths import default_run_dir
from sdpo_core.stages import STAGES, versioned_stages

log = logging.getLogger(__name__)


class VersioningError(RuntimeError):
    """A dvc or git command failed; the message holds its output."""


def _env(project: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("DVC_NO_ANALYTICS", "1")
    # DVC's site cache defaults to /var/tmp/dvc: keep it inside the checkout
    env.setdefault("DVC_SITE_CACHE_DIR", str((project / ".dvc" / "tmp" / "site-cache").resolve()))
    return env


def run_cmd(args: list[str], project: str | Path = ".") -> str:
    project = Path(project)
    proc = subprocess.run(args, cwd=project, env=_env(project), capture_output=True, text=True)
    if proc.returncode != 0:
        out = (proc.stdout + proc.stderr).strip()[-3000:]
        raise VersioningError(
            f"`{' '.join(args[2:] if args[0] == sys.executable else args)}` failed "
            f"(exit {proc.returncode}):\n{out}"
        )
    return proc.stdout


def dvc(*args: str, project: str | Path = ".") -> str:
    return run_cmd([sys.executable, "-m", "dvc", *args], project)


def stage_targets(pipeline: str, stages: list[str], project: str | Path = ".") -> list[str]:
    """``stage@pipeline`` for those of ``stages`` that dvc.yaml defines for ``pipeline``."""
    if not (Path(project) / "dvc.yaml").is_file():
        return []
    known = set(dvc("stage", "list", "--name-only", project=project).split())
    return [f"{s}@{pipeline}" for s in stages if f"{s}@{pipeline}" in known]


def configure_remote(settings: Settings, project: str | Path = ".") -> str | None:
    """Write the S3 remote (URL and endpoint from settings) into .dvc/config.local; returns the
    remote to use (None: the repo's default)."""
    remote = settings.dvc_remote
    if remote == "s3" and settings.s3.bucket:
        dvc("remote", "add", "--local", "-f", "s3", settings.s3_url("dvc"), project=project)
        if settings.s3.endpoint_url:
            dvc("remote", "modify", "--local", "s3", "endpointurl", settings.s3.endpoint_url, project=project)
        if settings.s3.region:
            dvc("remote", "modify", "--local", "s3", "region", settings.s3.region, project=project)
    return remote


def copy_into_checkout(pipeline: str, run_dir: str | Path, stages: list[str], project: str | Path = ".") -> list[str]:
    """The outputs of ``stages`` written in ``run_dir``, copied over the checkout's ``runs/<pipeline>``
    (what was there is replaced); nothing when ``run_dir`` is that folder. Returns the paths copied."""
    target = Path(project) / default_run_dir(pipeline)
    if Path(run_dir).resolve() == target.resolve():
        return []
    copied = []
    for stage in (s for s in STAGES if s.name in stages and s.versioned and s.takes_run_dir):
        for out in stage.outputs:
            src, dst = Path(run_dir) / out, target / out
            if not src.exists():
                continue
            if dst.is_dir():
                shutil.rmtree(dst)
            elif dst.exists():
                dst.unlink()
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copytree(src, dst) if src.is_dir() else shutil.copy2(src, dst)
            copied.append(str(dst))
    if copied:
        log.info("copied the outputs of %s into %s for DVC: %s", run_dir, target, " ".join(copied))
    return copied


def commit_and_push(
    pipeline: str, stages: list[str], settings: Settings, project: str | Path = "."
) -> list[str]:
    """Record the outputs of ``stages`` in dvc.lock and push them; returns the targets versioned."""
    targets = stage_targets(pipeline, stages, project)
    if not targets:
        log.warning("dvc.yaml has no stages for pipeline %s: its outputs are not versioned", pipeline)
        return []
    dvc("commit", "--force", *targets, project=project)
    log.info("dvc commit: %s", " ".join(targets))
    if settings.dvc.push:
        push(targets, settings, project)
    if settings.dvc.git_commit:
        git_commit_lock(pipeline, project)
    return targets


def remote_description(remote: str | None, settings: Settings, project: str | Path = ".") -> str:
    """``remote 's3' (s3://bucket/prefix/dvc at endpoint http://...)``: where a push goes."""
    rows = [line.split(None, 1) for line in dvc("remote", "list", project=project).splitlines()]
    urls = {row[0]: row[1].strip() for row in rows if len(row) == 2}
    name = remote or dvc("remote", "default", project=project).strip()
    url = urls.get(name, "?")
    endpoint = f" at endpoint {settings.s3.endpoint_url}" if remote == "s3" and settings.s3.endpoint_url else ""
    return f"remote {name!r} ({url}{endpoint})"


def push(targets: list[str], settings: Settings, project: str | Path = ".") -> None:
    """``dvc push`` of ``targets``, tried 1 + ``prefect.network_retries`` times (waits 2, 4, ... s);
    then VersioningError naming the remote and its endpoint. DVC pushes only what the remote lacks,
    so a later rerun completes a push that failed half-way."""
    remote = configure_remote(settings, project)
    where = remote_description(remote, settings, project)
    attempts = 1 + settings.prefect.network_retries
    for attempt in range(attempts):
        try:
            dvc("push", *(["--remote", remote] if remote else []), *targets, project=project)
        except VersioningError as exc:
            if attempt + 1 == attempts:
                raise VersioningError(
                    f"dvc push to {where} failed after {attempts} attempt(s); outputs are committed "
                    f"locally and a rerun pushes what the remote is missing. Last error: {exc}"
                ) from None
            log.warning("dvc push to %s failed (attempt %d of %d); retrying", where, attempt + 1, attempts)
            time.sleep(2 * 2**attempt)
        else:
            break
    log.info("dvc push to %s: %s", where, " ".join(targets))


def pull(pipeline: str, settings: Settings, project: str | Path = ".") -> list[str]:
    """``dvc pull`` every stage of ``pipeline`` (a fresh clone: model, prompts, eval)."""
    targets = stage_targets(pipeline, versioned_stages(), project)
    remote = configure_remote(settings, project)
    dvc("pull", *(["--remote", remote] if remote else []), *targets, project=project)
    return targets


def git_commit_lock(pipeline: str, project: str | Path = ".") -> None:
    git = ["git", "-C", str(project)]
    if not subprocess.run([*git, "status", "--porcelain", "dvc.lock"], capture_output=True, text=True).stdout:
        return
    run_cmd([*git, "add", "dvc.lock"], project)
    run_cmd([*git, "commit", "-q", "-m", f"dvc.lock: outputs of {pipeline}", "dvc.lock"], project)
