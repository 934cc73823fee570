"""Training as processes: the flow's train task runs ``sdpo train`` under ``accelerate launch``.

With ``num_processes`` > 1 (the flow parameter, else ``train.num_processes``, else one per visible
GPU) the task starts, on the worker's machine::

    python -m accelerate.commands.launch --num_processes N --num_machines 1 --main_process_ip 127.0.0.1
        --main_process_port PORT --mixed_precision MP --dynamo_backend no (--multi_gpu | --config_file F)
        -m sdpo_core.cli train --pipeline P --pipelines FILE --run-dir DIR --set ... [--resume]
        [--tracking-run-id RUN]

- the real ``sdpo train`` command, so a launched run and a user's own ``accelerate launch`` run the
  same code; ``--tracking-run-id`` makes rank 0 log into the flow's nested ``<p>-train`` MLflow run;
- the processes' output goes line by line into the flow run's logs as it comes (``[train]`` lines,
  at the level the CLI logged them);
- the launcher runs in its own session. When the flow run is cancelled Prefect raises
  ``TerminationSignal`` in the flow's main thread (its process worker first sends SIGTERM to the flow
  run's process group; ``serve`` to the flow run's process): the task then sends SIGTERM to the
  launcher's process group, which stops its ranks with SIGTERM; each rank's ``sdpo train`` finishes
  the checkpoint being written and exits 143, keeping its last complete checkpoint. After
  ``launch.stop_seconds`` (20 s; the worker SIGKILLs the flow run 30 s after its own SIGTERM) what is
  left of the launcher and its ranks gets SIGKILL. The next run resumes from that checkpoint;
- the flow holds the run directory's lock and hands it to rank 0 (``sdpo_core.rundir.lock``).

One process stays in the flow's own process (``stages.train_stage``, as before): a subprocess
would cost a fresh interpreter importing torch and diffusers on every run (about 8 s on the
2-core test machine, a minute of the test suite) for nothing the in-process call lacks: its
logs already reach the flow run (``sdpo_core`` logger), and a cancel raises ``TerminationSignal``
in the same thread, which stops training the same way (the checkpoint being written is finished,
the last complete one is kept).
"""

from __future__ import annotations

import collections
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from pathlib import Path

from sdpo_core.config import ConfigError

LEVEL = re.compile(r"^\d\d:\d\d:\d\d (DEBUG|INFO|WARNING|ERROR|CRITICAL) ")  # the CLI's log format
GLOG = re.compile(r"^([IWEF])\d{4} \d\d:\d\d:\d\d")  # torch's launcher: W1207 06:14:25.350000 ...
GLOG_LEVELS = {"I": logging.INFO, "W": logging.WARNING, "E": logging.ERROR, "F": logging.CRITICAL}
PROGRESS = re.compile(r"\d+%\|.*\| *\d+/\d+ \[")  # a tqdm bar's frame (the trainer's bars ignore TQDM_DISABLE)
CHILD_ENV = {"PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1"}  # lines as they come, no progress bars


class TrainingProcessError(RuntimeError):
    """The launched training exited with an error; the message carries its last error line."""


def visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def resolve_num_processes(requested: int | None, configured: int | None, gpus: int | None = None) -> int:
    """The flow parameter, else ``train.num_processes``, else one per visible GPU (1 without one)."""
    for name, value in (("num_processes", requested), ("train.num_processes", configured)):
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a whole number >= 1, got {value!r}")
            return value
    return max(1, visible_gpus() if gpus is None else gpus)


def free_port() -> int:
    """A free TCP port on 127.0.0.1 for the processes' rendezvous (the launcher's own default, 29500,
    would collide between two runs on one machine)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_args(pipeline: str, pipelines_file: str, run_dir: Path, overrides: Iterable[str], resume: bool,
               tracking_run_id: str | None) -> list[str]:
    """The ``sdpo train`` arguments of a flow's training."""
    args = ["--pipeline", pipeline, "--pipelines", pipelines_file, "--run-dir", str(run_dir)]
    for override in overrides:
        args += ["--set", override]
    if resume:
        args.append("--resume")
    if tracking_run_id:
        args += ["--tracking-run-id", tracking_run_id]
    return args


def launch_command(num_processes: int, port: int, mixed_precision: str, args: list[str],
                   accelerate_config: str | None = None) -> list[str]:
    """``accelerate launch`` of ``sdpo train ARGS`` on this machine (module docstring)."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(num_processes),
           "--num_machines", "1", "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
           "--mixed_precision", mixed_precision, "--dynamo_backend", "no"]
    cmd += ["--config_file", accelerate_config] if accelerate_config else ["--multi_gpu"]
    return [*cmd, "-m", "sdpo_core.cli", "train", *args]


def parse_line(line: str) -> tuple[int, str] | None:
    """(level, message) of one output line of ``sdpo train`` for the flow run's logs: a log record keeps
    its level (its time and level dropped: Prefect shows both), ``error: ...`` is an error, anything
    else information; None for an empty line or a progress bar's frame."""
    line = line.rstrip()
    if not line or PROGRESS.search(line):
        return None
    match = LEVEL.match(line)
    if match:
        return logging.getLevelName(match.group(1)), line[match.end():]
    if glog := GLOG.match(line):
        return GLOG_LEVELS[glog.group(1)], line
    return (logging.ERROR if line.startswith("error:") else logging.INFO), line


def _pump(stream, log: logging.Logger | logging.LoggerAdapter, tail: collections.deque) -> None:
    for raw in stream:  # text mode: "\r" (a progress bar) ends a line too
        parsed = parse_line(raw)
        if parsed is not None:
            tail.append(parsed[1])
            log.log(parsed[0], "[train] %s", parsed[1])


def run_streaming(cmd: list[str], env: dict[str, str], log: logging.Logger | logging.LoggerAdapter,
                  stop_seconds: float, pass_fds: tuple[int, ...] = ()) -> None:
    """Run ``cmd`` in its own session, its output into ``log`` line by line; stop it (SIGTERM, then
    SIGKILL after ``stop_seconds``) when this thread is interrupted; TrainingProcessError if it fails."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
                            env={**env, **CHILD_ENV}, start_new_session=True, pass_fds=pass_fds)
    tail: collections.deque = collections.deque(maxlen=50)
    reader = threading.Thread(target=_pump, args=(proc.stdout, log, tail), daemon=True)
    reader.start()
    try:
        code = proc.wait()
    except BaseException as exc:  # Prefect's TerminationSignal (cancel), KeyboardInterrupt, ...
        log.warning("%s: stopping the training processes (SIGTERM, SIGKILL after %.0f s)", type(exc).__name__,
                    stop_seconds)
        stop(proc, stop_seconds)
        reader.join(timeout=5)
        raise
    reader.join(timeout=30)
    if code != 0:
        errors = [line for line in tail if line.startswith("error:")]
        last = errors[-1] if errors else (tail[-1] if tail else "no output")
        raise TrainingProcessError(f"`sdpo train` under accelerate launch exited with {code}: {last}")


def stop(proc: subprocess.Popen, stop_seconds: float) -> None:
    """SIGTERM to the launcher's process group (it stops its ranks with SIGTERM); SIGKILL to whatever
    of the launcher and its descendants is still alive after ``stop_seconds``."""
    tree = descendants(proc.pid)  # the ranks sit in sessions of their own (torch elastic)
    deadline = time.monotonic() + stop_seconds
    _signal_group(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=stop_seconds)
    except subprocess.TimeoutExpired:
        pass
    while [p for p in tree if _alive(p)] and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in [proc.pid, *tree]:
        if _alive(pid):
            _signal_group(pid, signal.SIGKILL)
            _kill(pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 10  # SIGKILL is delivered when the process next runs
    while [p for p in tree if _alive(p)] and time.monotonic() < deadline:
        time.sleep(0.05)


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _stat(pid: int | str) -> tuple[str, int] | None:
    """(state, parent pid) of a process from /proc (None: gone, or no /proc)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[1].split()  # the command name, in parentheses, may hold spaces
    return fields[0], int(fields[1])


def _alive(pid: int) -> bool:
    stat = _stat(pid)
    return stat is not None and stat[0] not in ("Z", "X")


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (Linux /proc; empty elsewhere)."""
    children: dict[int, list[int]] = collections.defaultdict(list)
    for entry in Path("/proc").glob("[0-9]*"):
        stat = _stat(entry.name)
        if stat is not None:
            children[stat[1]].append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found
