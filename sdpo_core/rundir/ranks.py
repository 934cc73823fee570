"""Which process does what when ``torchrun`` / ``accelerate launch`` start N processes of a command.

    if ranks.is_main_process(): write(...)               # rank 0: files, MLflow, what is printed
    split = ranks.main_only(prepare, cfg, out)           # rank 0 runs it; every rank gets its result (or error)
    per_rank = ranks.gather(value)                       # [rank 0's, rank 1's, ...] on every rank

Global rank 0 (the main process) is the one writer: every file in the run directory, every MLflow
call, the command's printed result. The other ranks compute, read and log only warnings and errors
(``cli.py``). One process (no launcher) is rank 0 of 1, and every function here is then a plain call
that loads nothing.

Every rank must call the collectives here (``barrier``, ``broadcast``, ``gather``, ``main_only``,
``from_main_process``, ``check_shared_run_dir``) in the same order: code never branches on the
rank before one. An error on one rank before a collective leaves the others waiting in it; the
launcher then stops them (torchrun sends SIGTERM to every worker once one fails), so no rank waits
for ever.

The run directory must be one directory seen by every rank, on every node (a shared filesystem
when several machines run one job): every rank reads it (checkpoints to resume from, the prompt
split) and only rank 0 writes it. :func:`check_shared_run_dir` proves it at the start of every
stage (``run_lock`` calls it): rank 0 writes a file with a random token, every rank reads it back.

The process identity comes from the launcher's environment (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, which torchrun and ``accelerate launch`` set; MPI's as accelerate reads them); the
collectives use accelerate's ``PartialState``, which starts the process group that the trainer's
``Accelerator`` then reuses.
"""

from __future__ import annotations

import copy
import os
import pickle
import secrets
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any, TypeVar, cast

T = TypeVar("T")
SHARED_CHECK_PREFIX = ".shared-check-"
# how long a rank looks for rank 0's token file: a network filesystem may show a new file late
SHARED_CHECK_WAIT = 2.0


class RunDirNotShared(RuntimeError):
    """The ranks of one launch do not see the same run directory (bad input: exit 2)."""


class ReportedByRankZero(Exception):
    """This rank stops for an error that rank 0 hit and reports (printed once, by rank 0)."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


# ------------------------------------------------------------------------------ who am I
# the variables torchrun / accelerate launch set, then MPI's (accelerate's CPU launches: the same list)
RANK_VARS = ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK")
WORLD_SIZE_VARS = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
LOCAL_RANK_VARS = ("LOCAL_RANK", "MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK", "MV2_COMM_WORLD_LOCAL_RANK")


def _env_int(names: tuple[str, ...], default: int) -> int:
    return next((int(os.environ[n]) for n in names if os.environ.get(n)), default)


def rank() -> int:
    """Global rank: 0 .. world_size() - 1 (0 without a launcher)."""
    return _env_int(RANK_VARS, 0)


def world_size() -> int:
    return _env_int(WORLD_SIZE_VARS, 1)


def local_rank() -> int:
    """Rank among the processes of this machine."""
    return _env_int(LOCAL_RANK_VARS, 0)


def is_main_process() -> bool:
    """Global rank 0: the process that writes, tracks and prints."""
    return rank() == 0


def is_local_main_process() -> bool:
    """Rank 0 of this machine (the one that shows progress bars there)."""
    return local_rank() == 0


def launched() -> bool:
    """Started by a launcher with more than one process."""
    return world_size() > 1


# ------------------------------------------------------------------------------ collectives
def _state() -> Any:
    """accelerate's process state (the process group), the way the trainer's Accelerator makes it."""
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def barrier() -> None:
    """Wait until every rank is here."""
    if launched():
        _state().wait_for_everyone()


def broadcast(value: T) -> T:
    """Rank 0's ``value`` (any picklable object), on every rank."""
    if not launched():
        return value
    from accelerate.utils import broadcast_object_list

    _state()
    return broadcast_object_list([value])[0]


def gather(value: T) -> list[T]:
    """Every rank's ``value`` (picklable), in rank order, on every rank."""
    if not launched():
        return [value]
    from accelerate.utils import gather_object

    _state()
    return gather_object([value])


def _sendable(error: Exception) -> Exception:
    # the broadcast pickles it and the other ranks rebuild it: deepcopy rebuilds it the same way
    # (__reduce_ex__), so an error class whose __init__ cannot be called again is caught here
    try:
        pickle.dumps(error)
        copy.deepcopy(error)
    except Exception:  # an error class that does not pickle: its message still travels
        return RuntimeError(f"{type(error).__name__}: {error}")
    return error


def main_only(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` on rank 0 alone (a check or a write), its result for every rank. When it raises,
    rank 0 raises that error and the other ranks :class:`ReportedByRankZero` (the CLI prints it once)."""
    if not launched():
        return fn(*args)
    result: Any = None
    error: Exception | None = None
    if is_main_process():
        try:
            result = fn(*args)
        except Exception as exc:
            error = exc
    result, sent = broadcast((result, None if error is None else _sendable(error)))
    if error is not None:
        raise error
    if sent is not None:
        raise ReportedByRankZero(sent)
    return result


@contextmanager
def from_main_process(make: Callable[[], AbstractContextManager[T]]) -> Iterator[T]:
    """Enter ``make()`` on rank 0 alone (e.g. a download only rank 0 may make), give every rank its
    value, and leave it on rank 0 once every rank is done with the ``with`` block."""
    if not launched():
        with make() as value:
            yield value
        return
    with make() if is_main_process() else nullcontext() as made:
        yield cast(T, broadcast(made))
        barrier()  # not on an error: a rank that failed reaches no collective again


# ------------------------------------------------------------------------------ the run directory
def check_shared_run_dir(run_dir: str | Path) -> None:
    """Raise :class:`RunDirNotShared` (one line, on rank 0; the others stop quietly) unless every
    rank sees the file with a random token that rank 0 writes into ``run_dir``. Rank 0 has created
    ``run_dir`` (``run_lock``); without a launcher this does nothing."""
    if not launched():
        return
    run_dir = Path(run_dir)
    token = broadcast(secrets.token_hex(8) if is_main_process() else "")
    path = run_dir / f"{SHARED_CHECK_PREFIX}{token}"
    if is_main_process():
        run_dir.mkdir(parents=True, exist_ok=True)
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(token)
            fh.flush()
            os.fsync(fh.fileno())
    barrier()
    seen = gather((rank(), socket.gethostname(), None if is_main_process() else _read_token(path, token)))
    if is_main_process():
        path.unlink(missing_ok=True)
    problems = [(r, host, why) for r, host, why in seen if why is not None]
    if not problems:
        return
    if not is_main_process():
        raise ReportedByRankZero(RunDirNotShared("run dir not shared"))
    where = ", ".join(f"rank {r} on {host}: {why}" for r, host, why in problems)
    raise RunDirNotShared(
        f"run dir {run_dir} is not shared between the nodes: rank 0 on {socket.gethostname()} wrote {path} and "
        f"{len(problems)} rank(s) cannot read it ({where}); put the run dir on a filesystem every node mounts at "
        "the same path and pass that path to every node (e.g. --run-dir /shared/runs/NAME)"
    )


def _read_token(path: Path, token: str) -> str | None:
    """None when ``path`` holds ``token``; else what is wrong, after looking for SHARED_CHECK_WAIT s."""
    deadline = time.monotonic() + SHARED_CHECK_WAIT
    while True:
        try:
            os.listdir(path.parent)  # refreshes a network filesystem's cached view of the folder
            text = path.read_text(encoding="utf-8")
            problem = None if text == token else f"{path} holds another token"
        except FileNotFoundError:
            problem = f"no {path if path.parent.is_dir() else path.parent}"
        except OSError as exc:
            problem = f"{type(exc).__name__}: {exc}"
        if problem is None or time.monotonic() > deadline:
            return problem
        time.sleep(0.1)
