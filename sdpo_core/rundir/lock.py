"""One writer per run directory: an OS file lock on ``RUN_DIR/.lock``.

    with run_lock(run_dir):        # RunLockedError at once if another process holds it
        ...write into run_dir...

The lock is ``fcntl.flock`` on ``RUN_DIR/.lock``: the kernel drops it when its process exits,
however it exits (a crash or ``kill -9`` leaves no stale lock to clean up). While holding it the
process writes its PID, host and start time into the file, which is what a refused second run
reports. The lock is re-entrant within a process (``sdpo run`` and the Prefect flow hold it around
stages that take it again). Under ``torchrun`` / ``accelerate launch`` only global rank 0 (the
process that writes) takes it; the other ranks write nothing. Every rank enters ``run_lock`` at the
same points, and the outermost entry checks that every rank sees the same run directory
(``ranks.check_shared_run_dir``: a collective, so rank 0 holds the lock while the others check).

A process holding the lock can launch the writer itself (the Prefect flow starts ``sdpo train``
under ``accelerate launch``): it passes :func:`launch_env` in the launcher's environment and
:func:`held_fd` in its ``pass_fds``. Rank 0 then writes under the launching process's lock instead of
refusing (when the lock file names that process, alive), and the launcher's copy of the locked
file keeps the lock held while training lives, even if the launching process dies first.

On release the holder deletes the file, and removes the run directory again if it created it and
left it empty (a refused or failed start writes nothing). Deleting a lock file is safe here because
a process that wins ``flock`` checks that the path still names the file it locked, and retries if not.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

from sdpo_core.rundir.ranks import check_shared_run_dir, is_main_process

LOCK_NAME = ".lock"

HOLDER_ENV = "SDPO_RUN_LOCK_HOLDER"  # "<pid>:<resolved run dir>": the launching process holds the lock
_held: dict[Path, int] = {}  # resolved run dir -> nesting depth, for this process
_fds: dict[Path, int] = {}  # resolved run dir -> the locked file's descriptor, for this process
_guard = threading.Lock()


class RunLockedError(RuntimeError):
    """Another live process is writing into this run directory."""


def is_writer_rank() -> bool:
    """Global rank 0, or not a distributed launch: the process that writes (``ranks.is_main_process``)."""
    return is_main_process()


def launch_env(run_dir: str | Path) -> dict[str, str]:
    """The environment entry that lets a writer launched by this process (which holds the lock of
    ``run_dir``) write under that lock."""
    return {HOLDER_ENV: f"{os.getpid()}:{Path(run_dir).resolve()}"}


def held_fd(run_dir: str | Path) -> int | None:
    """The descriptor of ``run_dir``'s locked file while this process holds it (for ``pass_fds``)."""
    with _guard:
        return _fds.get(Path(run_dir).resolve())


def _held_by_launcher(key: Path) -> bool:
    """This process was launched by the live holder of ``key``'s lock (see :func:`launch_env`)."""
    pid, _, path = os.environ.get(HOLDER_ENV, "").partition(":")
    if not pid.isdigit() or Path(path) != key:
        return False
    try:
        info = json.loads((key / LOCK_NAME).read_text(encoding="utf-8"))
        os.kill(int(pid), 0)
    except (OSError, ValueError):
        return False
    return str(info.get("pid")) == pid


def _describe_holder(lock_path: Path) -> str:
    try:
        info = json.loads(lock_path.read_text(encoding="utf-8"))
        return f"PID {info['pid']} on {info['host']}, started {info['started']}"
    except (OSError, ValueError, KeyError):  # the holder is between flock and writing its details
        return "a process that has just started"


def _acquire(lock_path: Path) -> int:
    """Lock ``lock_path`` (created if missing); returns the fd. Raises RunLockedError if held."""
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunLockedError(
                f"{lock_path.parent} is in use by another run ({_describe_holder(lock_path)}); wait for it to "
                f"finish or stop it, or choose another --run-dir"
            ) from None
        try:
            same = os.stat(lock_path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # the previous holder deleted the file as we locked it: lock the new one


@contextmanager
def run_lock(run_dir: str | Path) -> Iterator[Path]:
    """Hold the run directory's lock for the ``with`` block (creating the directory if needed); under
    a launcher, rank 0 holds it and the outermost entry checks that the directory is shared."""
    run_dir = Path(run_dir)
    key = run_dir.resolve()
    with _guard:
        reentered = key in _held
        if reentered:
            _held[key] += 1
    if reentered:
        try:
            yield run_dir
        finally:
            with _guard:
                _held[key] -= 1
        return
    # rank 0 locks, unless the process that launched it holds the lock for it (launch_env)
    with _file_lock(run_dir, key) if is_writer_rank() and not _held_by_launcher(key) else nullcontext():
        with _guard:
            _held[key] = 1
        try:
            check_shared_run_dir(run_dir)
            yield run_dir
        finally:
            with _guard:
                del _held[key]


@contextmanager
def _file_lock(run_dir: Path, key: Path) -> Iterator[None]:
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    lock_path = run_dir / LOCK_NAME
    try:
        fd = _acquire(lock_path)
    except BaseException:
        _remove_if_empty(run_dir, created)
        raise
    info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps(info).encode())
    os.fsync(fd)
    with _guard:
        _fds[key] = fd
    try:
        yield
    finally:
        with _guard:
            del _fds[key]
        lock_path.unlink(missing_ok=True)  # still locked: a waiter re-checks the path (see _acquire)
        os.close(fd)
        _remove_if_empty(run_dir, created)


def _remove_if_empty(run_dir: Path, created: bool) -> None:
    if created:
        try:
            run_dir.rmdir()
        except OSError:  # not empty: the run wrote something
            pass
