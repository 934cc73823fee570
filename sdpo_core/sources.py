"""Prompt files where data pipelines keep them: ``s3://`` and ``http(s)://`` (fsspec), text or JSONL.

A remote source is read whole with fsspec (``s3://`` needs s3fs, installed with the ``pipeline``
extra through dvc-s3; credentials, region and endpoint come from the usual AWS settings, e.g.
``AWS_ENDPOINT_URL`` for an S3-compatible server). What was read is identified by the store's own
version (S3: ``etag`` and ``version_id`` when the bucket is versioned; HTTP: the ``ETag`` header)
and the sha256 of the bytes, which the prompt manifest records (``source_version``).

A file whose name ends in ``.jsonl`` holds one JSON object per line with a string ``prompt``;
other fields are metadata (kept out of the prompt; their names are listed in the manifest).
Anything else is text, one prompt per line.

A local file tracked by DVC (a ``<name>.dvc`` file beside it or beside a tracked folder above it,
or an output in a ``dvc.lock`` above it) is read as usual; its version is the DVC hash read from
that YAML file (``dvc_md5``; no dvc import). A tracked file missing from the workspace is an error
that says to run ``dvc pull``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

REMOTE_SCHEMES = ("s3://", "http://", "https://")


class SourceError(ValueError):
    """A prompt source that cannot be read; the message names it and what was expected."""


@dataclass(frozen=True)
class SourceText:
    """The lines of a prompt source and what identifies the version that was read."""

    lines: list[str]
    version: dict = field(default_factory=dict)
    metadata_fields: list[str] = field(default_factory=list)


def is_remote(source: str) -> bool:
    return source.startswith(REMOTE_SCHEMES)


def _remote_version(info: dict) -> dict:
    """The store's version fields of an fsspec ``info`` dict (S3 keys or HTTP headers)."""
    version = {}
    for key, name in (("ETag", "etag"), ("VersionId", "version_id"), ("Last-Modified", "last_modified")):
        if info.get(key):
            version[name] = str(info[key]).strip('"')
    return version


def fetch(source: str) -> tuple[bytes, dict]:
    """(bytes, version) of a remote ``source``; SourceError naming it when it cannot be read."""
    import fsspec  # comes with huggingface_hub; s3fs is loaded by fsspec for s3://

    try:
        # version_aware: s3fs reports and reads object versions (a plain bucket works the same)
        fs, path = fsspec.core.url_to_fs(source, **({"version_aware": True} if source.startswith("s3://") else {}))
        info = fs.info(path)
        version = _remote_version(info)
        if version.get("version_id"):  # the object version we just looked at, even if replaced since
            data = fs.cat_file(path, version_id=version["version_id"])
        else:
            data = fs.cat_file(path)
    except ImportError as exc:
        raise SourceError(f"prompts.source: '{source}' needs {exc.name or 's3fs'} (pip install 'sdpo[pipeline]')") from None
    except (OSError, ValueError) as exc:  # missing object (FileNotFoundError), refused connection, HTTP errors
        raise SourceError(f"prompts.source: cannot read '{source}': {type(exc).__name__}: {exc}") from None
    return data, {**version, "sha256": hashlib.sha256(data).hexdigest()}


def decode(data: bytes, source: str) -> str:
    try:
        return data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise SourceError(
            f"prompts.source: '{source}' is not valid UTF-8: byte 0x{data[exc.start]:02x} at byte offset "
            f"{exc.start} (line {line}); save the file as UTF-8"
        ) from None


def jsonl_prompts(text: str, source: str) -> tuple[list[str], list[str]]:
    """(prompts, metadata field names) of JSONL text: one object per non-empty line with a string
    ``prompt``."""
    prompts, extra = [], set()
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise SourceError(f"prompts.source: '{source}' line {number} is not JSON ({exc.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise SourceError(f"prompts.source: '{source}' line {number}: expected an object with a string "
                              f"'prompt', got {line[:80]!r}")
        prompts.append(record["prompt"])
        extra |= set(record) - {"prompt"}
    return prompts, sorted(extra)


def parse(data: bytes, source: str, version: dict | None = None) -> SourceText:
    """The prompt lines of ``data`` read from ``source`` (JSONL by its ``.jsonl`` name, else text)."""
    text = decode(data, source)
    if source.split("?", 1)[0].endswith(".jsonl"):
        prompts, fields = jsonl_prompts(text, source)
        return SourceText(prompts, version or {}, fields)
    return SourceText(text.splitlines(), version or {})


def read_source(source: str) -> SourceText:
    """A remote source, or a local ``.jsonl`` file (its version: the sha256 of its bytes)."""
    if is_remote(source):
        data, version = fetch(source)
    else:
        path = Path(source)
        if not path.is_file():
            raise SourceError(f"prompts.source: file '{source}' does not exist; expected a JSONL file with one "
                              "object per line with a string 'prompt'")
        data = path.read_bytes()
        version = {"sha256": hashlib.sha256(data).hexdigest()}
    return parse(data, source, version)


def _dvc_outs(path: Path) -> list[dict]:
    """The ``outs`` of a ``.dvc`` file or of every stage of a ``dvc.lock``."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise SourceError(f"prompts.source: cannot read the DVC file '{path}': {exc}") from None
    if path.name == "dvc.lock":
        return [out for stage in (data.get("stages") or {}).values() for out in stage.get("outs") or []]
    return list(data.get("outs") or [])


def _tracking(path: Path) -> tuple[Path, dict] | None:
    """(DVC file, its ``out`` entry) that tracks ``path`` itself or a folder holding it, nearest first,
    up to the DVC repository's root (the folder with ``.dvc/``)."""
    path = path.absolute()
    chain = [path, *path.parents]
    for target, folder in zip(chain[:-1], chain[1:], strict=True):  # the file, then each folder holding it
        sidecar = folder / f"{target.name}.dvc"
        if sidecar.is_file():
            for out in _dvc_outs(sidecar):
                if out.get("path") == target.name:
                    return sidecar, out
        lock = folder / "dvc.lock"
        if lock.is_file():
            inside = path.relative_to(folder).as_posix()
            for out in _dvc_outs(lock):
                if inside == out.get("path") or inside.startswith(f"{str(out.get('path')).rstrip('/')}/"):
                    return lock, out
        if (folder / ".dvc").is_dir():
            break
    return None


def dvc_version(source: str) -> dict:
    """The DVC version of a local ``source`` (``dvc_md5``, ``dvc_file``, ``dvc_path``), or {} when DVC
    does not track it. ``dvc_modified`` is true when the file's bytes no longer match the md5 of a
    single tracked file (edited since ``dvc add``/``dvc commit``). SourceError saying to run
    ``dvc pull`` when the file is tracked but absent."""
    path = Path(source)
    found = _tracking(path)
    if found is None:
        return {}
    dvc_file, out = found
    if not path.is_file():
        raise SourceError(f"prompts.source: '{source}' is tracked by DVC ({dvc_file}) but is not in the "
                          f"workspace; run `dvc pull {source}` first")
    md5 = str(out.get("md5", ""))
    version = {"dvc_md5": md5, "dvc_file": str(dvc_file), "dvc_path": str(out.get("path"))}
    if md5 and not md5.endswith(".dir") and hashlib.md5(path.read_bytes()).hexdigest() != md5:
        version["dvc_modified"] = True
    return version
