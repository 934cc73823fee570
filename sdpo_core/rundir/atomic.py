"""Writes that are all-or-nothing: a reader sees the old content or the new, never half of it.

Each writes a temporary sibling, fsyncs it, renames it over the target (``os.replace`` is atomic
within a filesystem) and fsyncs the parent directory so the rename itself survives a power cut.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def fsync_dir(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str | Path) -> None:
    """fsync every file under ``root``, then every directory (deepest first)."""
    dirs = []
    for dirpath, _, files in os.walk(root):
        dirs.append(dirpath)
        for name in files:
            with open(os.path.join(dirpath, name), "rb+") as fh:
                os.fsync(fh.fileno())
    for d in reversed(dirs):
        fsync_dir(d)


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def replace_dir(tmp: str | Path, final: str | Path) -> None:
    """Move the complete directory ``tmp`` to ``final``, replacing an old ``final``.

    A directory cannot be renamed over a non-empty one, so the old one is renamed aside first; a
    crash in between leaves ``final.old`` and the complete ``tmp``, never a half ``final``.
    """
    tmp, final = Path(tmp), Path(final)
    fsync_tree(tmp)
    old = final.with_name(f"{final.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    if old.exists():
        shutil.rmtree(old)
