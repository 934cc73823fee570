"""The parts of the flow's process launch and run-directory policy, without Prefect or a model:
the `accelerate launch` command, the process count, the log lines, stopping a launched tree, the
start policy of a run directory, the lock handed to a launched writer, and the copy for DVC.
A few seconds in all (real child processes of a bare interpreter)."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from flows import launch, rundirs
from sdpo_core.config import ConfigError


# ----------------------------------------------------------------------------------- the command
def test_launch_command_runs_the_real_sdpo_train_under_accelerate_on_this_machine():
    args = launch.train_args("tiny-random", "pipelines.yaml", Path("/runs/tiny-random"),
                             ["train.epochs=3", "train.num_processes=2"], resume=True, tracking_run_id="abc")
    assert args == ["--pipeline", "tiny-random", "--pipelines", "pipelines.yaml", "--run-dir", "/runs/tiny-random",
                    "--set", "train.epochs=3", "--set", "train.num_processes=2", "--resume", "--tracking-run-id", "abc"]
    cmd = launch.launch_command(2, 29501, "bf16", args)
    assert cmd[:3] == [sys.executable, "-m", "accelerate.commands.launch"]  # the flow's own interpreter
    opts = cmd[3:cmd.index("-m", 3)]
    assert opts[-1] == "--multi_gpu" and "--config_file" not in opts
    assert dict(zip(opts[:-1:2], opts[1:-1:2], strict=True)) == {
        "--num_processes": "2", "--num_machines": "1", "--main_process_ip": "127.0.0.1",
        "--main_process_port": "29501", "--mixed_precision": "bf16", "--dynamo_backend": "no",
    }
    assert cmd[cmd.index("-m", 3):] == ["-m", "sdpo_core.cli", "train", *args]
    # an accelerate config (FSDP, ...) decides the distributed type itself: no --multi_gpu beside it
    with_config = launch.launch_command(4, 29501, "no", [], accelerate_config="configs/accelerate/fsdp.yaml")
    assert "--multi_gpu" not in with_config
    assert with_config[with_config.index("--config_file") + 1] == "configs/accelerate/fsdp.yaml"
    assert launch.train_args("p", "f", Path("d"), [], resume=False, tracking_run_id=None)[-1] == "d"


def test_num_processes_comes_from_the_parameter_then_the_config_then_the_gpus():
    assert launch.resolve_num_processes(3, 2, gpus=8) == 3
    assert launch.resolve_num_processes(None, 2, gpus=8) == 2
    assert launch.resolve_num_processes(None, None, gpus=8) == 8
    assert launch.resolve_num_processes(None, None, gpus=0) == 1  # no GPU: one process
    for bad in (0, -1, True, 1.5):
        with pytest.raises(ConfigError, match="num_processes must be a whole number >= 1"):
            launch.resolve_num_processes(bad, None, gpus=1)


def test_output_lines_keep_their_level_and_progress_bars_are_dropped():
    assert launch.parse_line("06:22:02 WARNING sdpo_core.training.trainer: careful\n") == (
        logging.WARNING, "sdpo_core.training.trainer: careful")
    assert launch.parse_line("06:22:02 INFO sdpo_core.x: epoch 0: first=1") == (logging.INFO, "sdpo_core.x: epoch 0: first=1")
    assert launch.parse_line("error: the run dir is in use") == (logging.ERROR, "error: the run dir is in use")
    assert launch.parse_line("W1207 06:14:25.350000 7000 torch/api.py:753] Received 15 death signal")[0] == logging.WARNING
    assert launch.parse_line("  seed: 42") == (logging.INFO, "  seed: 42")
    assert launch.parse_line("epoch 0: training:  50%|█████     | 2/4 [00:00<00:00, 10.45it/s]") is None
    assert launch.parse_line("   \n") is None


# ---------------------------------------------------------------------------- running, stopping
class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def records():
    log = logging.getLogger("test_launch_parts")
    handler = Records()
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)
    yield log, handler.records
    log.removeHandler(handler)


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


def test_a_failing_training_streams_its_lines_and_fails_with_its_error(records):
    log, seen = records
    code = """
        import sys, time
        print("06:00:00 INFO sdpo_core.trainer: epoch 0: first=1", flush=True)
        print("step 1 of 2\\rstep 2 of 2", flush=True)
        print("error: train.epochs must be >= 1", file=sys.stderr, flush=True)
        sys.exit(2)
    """
    with pytest.raises(launch.TrainingProcessError, match=r"exited with 2: error: train.epochs must be >= 1"):
        launch.run_streaming(_python(code), dict(os.environ), log, stop_seconds=5)
    lines = [(r.levelno, r.getMessage()) for r in seen]
    assert (logging.INFO, "[train] sdpo_core.trainer: epoch 0: first=1") in lines
    assert (logging.INFO, "[train] step 2 of 2") in lines  # "\r" ends a line
    assert (logging.ERROR, "[train] error: train.epochs must be >= 1") in lines


def _interrupt_once(marker: Path):
    """Raise KeyboardInterrupt in this (the main) thread once ``marker`` exists: as Prefect's SIGTERM
    handler raises TerminationSignal in a cancelled flow run's main thread."""
    def handler(signum, frame):
        if marker.exists():
            signal.setitimer(signal.ITIMER_REAL, 0)
            raise KeyboardInterrupt
    previous = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, 0.1, 0.1)
    return previous


def test_an_interrupted_launch_stops_the_launcher_and_its_ranks(records, tmp_path):
    """The launcher (SIGTERM: it stops its rank and exits) and a rank in a session of its own that
    ignores SIGTERM (SIGKILL after stop_seconds): none is left, whatever signal each needed."""
    log, seen = records
    code = f"""
        import os, signal, subprocess, sys, time
        rank = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, "
                                 "signal.SIG_IGN); open({str(tmp_path / 'rank')!r}, 'w').close(); time.sleep(60)"],
                                start_new_session=True)
        def stop(signum, frame):
            open({str(tmp_path / 'launcher_got_sigterm')!r}, "w").close()
            sys.exit(143)
        signal.signal(signal.SIGTERM, stop)
        print(rank.pid, flush=True)
        rank.wait()
    """
    previous = _interrupt_once(tmp_path / "rank")
    start = time.monotonic()
    try:
        with pytest.raises(KeyboardInterrupt):
            launch.run_streaming(_python(code), dict(os.environ), log, stop_seconds=1.5)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert time.monotonic() - start < 30
    assert (tmp_path / "rank").exists() and (tmp_path / "launcher_got_sigterm").exists()
    rank_pid = int(next(r.getMessage() for r in seen if r.getMessage().startswith("[train] ")).split()[1])
    assert not launch._alive(rank_pid), "the rank that ignored SIGTERM is still alive"
    assert any("stopping the training processes" in r.getMessage() for r in seen)


# ----------------------------------------------------------------------- the run directory policy
def _leave_training(run_dir: Path, epochs: int = 2, owner: str | None = None) -> None:
    for e in range(epochs):
        (run_dir / "checkpoints" / f"epoch_{e:04d}").mkdir(parents=True)
    (run_dir / "train_metrics.jsonl").write_text("".join(json.dumps({"epoch": e}) + "\n" for e in range(epochs)))
    if owner:
        rundirs.claim(run_dir, owner, "a-name")


def test_a_new_run_refuses_an_earlier_training_unless_told_what_to_do(tmp_path):
    run_dir = tmp_path / "runs" / "p"
    assert rundirs.start_mode(run_dir, "run-2", resume=False, fresh=False) == "new"  # nothing there (yet)
    _leave_training(run_dir, owner="run-1")
    with pytest.raises(rundirs.RunDirRefused) as refused:
        rundirs.start_mode(run_dir, "run-2", resume=False, fresh=False)
    message = str(refused.value)
    assert "\n" not in message and "by flow run run-1" in message and "checkpoints/epoch_0001" in message
    assert "resume=true" in message and "fresh=true" in message
    assert rundirs.start_mode(run_dir, "run-2", resume=True, fresh=False) == "resume"
    assert rundirs.start_mode(run_dir, "run-2", resume=False, fresh=True) == "fresh"
    with pytest.raises(rundirs.RunDirRefused, match="exclude each other"):
        rundirs.start_mode(run_dir, "run-2", resume=True, fresh=True)
    # a retry of the flow run that trained here resumes its own checkpoints, even with fresh=true
    assert rundirs.start_mode(run_dir, "run-1", resume=False, fresh=True) == "resume"
    assert rundirs.start_mode(run_dir, "run-1", resume=False, fresh=False) == "resume"


def test_begin_training_clears_only_when_fresh_and_records_the_flow_run(tmp_path, records):
    log, seen = records
    run_dir = tmp_path / "run"
    _leave_training(run_dir, owner="run-1")
    assert rundirs.begin_training(run_dir, "resume", "run-2", "name-2", 1, log) is True
    assert (run_dir / "checkpoints" / "epoch_0001").is_dir() and rundirs.owner(run_dir) == "run-2"
    assert rundirs.begin_training(run_dir, "fresh", "run-3", "name-3", 1, log) is False
    assert rundirs.leftovers(run_dir) == [] and rundirs.owner(run_dir) == "run-3"
    # resume with no checkpoint at all: stale metrics go, training starts from scratch
    (run_dir / "train_metrics.jsonl").write_text('{"epoch": 0}\n')
    assert rundirs.begin_training(run_dir, "resume", "run-4", "name-4", 1, log) is False
    assert not (run_dir / "train_metrics.jsonl").exists()
    assert any("no checkpoint" in r.getMessage() for r in seen)


def test_run_dir_is_the_parameter_then_runs_root_then_the_checkout(tmp_path):
    assert rundirs.run_dir_for("p", str(tmp_path / "x"), tmp_path / "root") == tmp_path / "x"
    assert rundirs.run_dir_for("p", None, tmp_path / "root") == tmp_path / "root" / "p"
    assert rundirs.run_dir_for("p", None, None) == Path("runs") / "p"


def test_runs_root_must_be_absolute(monkeypatch, tmp_path):
    from flows.settings import SettingsError, load_settings

    monkeypatch.chdir(tmp_path)  # no orchestration.yaml here: defaults and the environment
    monkeypatch.setenv("SDPO_RUNS_ROOT", "shared/runs")
    with pytest.raises(SettingsError, match="SDPO_RUNS_ROOT: 'runs_root'.*must be an absolute path"):
        load_settings()
    monkeypatch.setenv("SDPO_RUNS_ROOT", str(tmp_path / "shared"))
    assert load_settings().runs_root == tmp_path / "shared"
    monkeypatch.setenv("SDPO_LAUNCH__STOP_SECONDS", "29")  # Prefect SIGKILLs the flow run after 30 s
    with pytest.raises(SettingsError, match="stop_seconds"):
        load_settings()


# ------------------------------------------------------------------------- the lock, handed over
def test_a_launched_writer_writes_under_its_launchers_lock_and_no_other_can(tmp_path):
    from sdpo_core.rundir.lock import held_fd, launch_env, run_lock

    run_dir = tmp_path / "run"
    writer = _python(f"""
        from sdpo_core.rundir.lock import RunLockedError, run_lock
        try:
            with run_lock({str(run_dir)!r}):
                print("wrote")
        except RunLockedError as exc:
            print("refused:", exc)
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    with run_lock(run_dir):
        assert held_fd(run_dir) is not None
        launched = subprocess.run(writer, env={**env, **launch_env(run_dir)}, capture_output=True, text=True,
                                  timeout=60)
        other = subprocess.run(writer, env=env, capture_output=True, text=True, timeout=60)
        # a stale claim (a holder that is not this one) does not open the lock either
        forged = subprocess.run(writer, env={**env, "SDPO_RUN_LOCK_HOLDER": f"1:{run_dir.resolve()}"},
                                capture_output=True, text=True, timeout=60)
    assert launched.stdout.strip() == "wrote", launched.stderr[-2000:]
    assert other.stdout.startswith("refused:") and forged.stdout.startswith("refused:")
    assert held_fd(run_dir) is None


# --------------------------------------------------------------------------------- DVC's copy
def test_outputs_made_outside_the_checkout_are_copied_into_its_stage_outs(tmp_path):
    from flows.versioning import copy_into_checkout

    project, run_dir = tmp_path / "project", tmp_path / "shared" / "p"
    (run_dir / "final").mkdir(parents=True)
    (run_dir / "final" / "w.safetensors").write_text("new")
    (run_dir / "config.yaml").write_text("seed: 1\n")
    (run_dir / "eval").mkdir()
    (run_dir / "eval" / "eval.json").write_text("{}")
    (project / "runs" / "p" / "final").mkdir(parents=True)
    (project / "runs" / "p" / "final" / "stale.safetensors").write_text("old")
    copied = copy_into_checkout("p", run_dir, ["train"], project)  # evaluate did not run: its outs stay
    assert sorted(Path(c).name for c in copied) == ["config.yaml", "final"]
    assert [f.name for f in (project / "runs/p/final").iterdir()] == ["w.safetensors"]
    assert not (project / "runs/p/eval").exists()
    assert copy_into_checkout("p", project / "runs" / "p", ["train"], project) == []  # already there
