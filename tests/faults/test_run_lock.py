"""Fault: two writers on one run directory (two `sdpo train` started a moment apart, or a second
Prefect flow run of the same pipeline)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fault_helpers import ROOT, env, sdpo, sdpo_cmd, tiny_args

HOLD = (
    "import sys, time\n"
    "from sdpo_core.rundir.lock import run_lock\n"
    "with run_lock(sys.argv[1]):\n"
    "    print('locked', flush=True)\n"
    "    sys.stdin.read()\n"  # hold until the test closes stdin (or kills us)
)


def _holder(run_dir) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], cwd=ROOT, env=env(),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_lock_names_the_holder_and_dies_with_it(tmp_path):
    """A process holds the lock: another one is refused at once with the holder's PID and start time;
    after the holder is SIGKILLed (no cleanup runs) the lock is free: no stale marker is left behind."""
    from sdpo_core.rundir.lock import RunLockedError, run_lock

    run_dir = tmp_path / "run"
    holder = _holder(run_dir)
    try:
        info = json.loads((run_dir / ".lock").read_text())
        assert info["pid"] == holder.pid and info["started"]
        t0 = time.perf_counter()
        with pytest.raises(RunLockedError, match=rf"in use by another run \(PID {holder.pid} on .*, started "):
            with run_lock(run_dir):
                pass
        assert time.perf_counter() - t0 < 1.0  # refused at once, not after a wait
    finally:
        holder.kill()
        holder.wait()
    assert (run_dir / ".lock").exists()  # SIGKILL: the file stays, the kernel released the flock
    with run_lock(run_dir):
        assert json.loads((run_dir / ".lock").read_text())["pid"] != holder.pid
    assert list(run_dir.iterdir()) == []  # released: the lock file is removed (the dir was not ours)
    with run_lock(tmp_path / "fresh"):
        pass
    assert not (tmp_path / "fresh").exists()  # a dir the lock created and nothing used is removed again


def test_lock_is_reentrant_in_one_process(tmp_path):
    """`sdpo run` and the flow hold the lock around stages that take it again: no self-deadlock,
    and the lock is held until the outermost block ends."""
    from sdpo_core.rundir.lock import run_lock

    with run_lock(tmp_path / "r"):
        with run_lock(tmp_path / "r"):
            pass
        assert (tmp_path / "r" / ".lock").exists()  # inner exit did not release it


@pytest.mark.slow
def test_second_sdpo_train_on_the_same_run_dir_exits_2(tiny_base, tmp_path):
    """Two `sdpo train` on one --run-dir: the second exits 2 at once naming the first's PID and writes
    nothing; the first finishes alone with one metrics line per epoch (the bug: both exited 0 with
    interleaved checkpoints and 6 lines for a 3-epoch run). The first run's reward waits for a gate
    file, so it is still inside its first epoch, holding the lock, whatever the second's start-up
    takes on a loaded machine; the test opens the gate once the second has exited."""
    run_dir, gate = tmp_path / "run", tmp_path / "gate"
    first_env = {**env(), "SDPO_TEST_GATE": str(gate),
                 "PYTHONPATH": os.pathsep.join([str(ROOT), str(Path(__file__).parent)])}
    args = tiny_args(tiny_base, run_dir, "train.epochs=3", "reward.name=reward_fault_fns:gated_brightness")
    first = subprocess.Popen(sdpo_cmd("train", *args), cwd=ROOT, env=first_env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (run_dir / ".lock").is_file() or not (run_dir / ".lock").read_text():
            assert first.poll() is None and time.time() < deadline, first.communicate()
            time.sleep(0.05)
        second = sdpo("train", *tiny_args(tiny_base, run_dir, "train.epochs=3"))
        assert first.poll() is None  # still gated in epoch 0: the refusal below was the lock's
    finally:
        gate.touch()
        _, first_err = first.communicate(timeout=300)
    assert second.returncode == 2, second.stderr[-2000:]
    assert f"PID {first.pid}" in second.stderr and "Traceback" not in second.stderr
    assert first.returncode == 0, first_err[-2000:]
    lines = (run_dir / "train_metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [0, 1, 2]
    assert not (run_dir / ".lock").exists()


def test_overlapping_flow_run_fails_clearly(tmp_path, monkeypatch):
    """A second flow run of a pipeline whose run dir is held (by another process) fails at once with
    RunLockedError naming the holder, before it opens an MLflow run or touches the run dir."""
    pytest.importorskip("prefect")
    from sdpo_core.rundir.lock import RunLockedError

    monkeypatch.chdir(tmp_path)
    (tmp_path / "pipelines.yaml").write_text((ROOT / "pipelines.yaml").read_text())
    holder = _holder(tmp_path / "runs" / "tiny-random")
    try:
        from flows.sdpo_flow import sdpo as flow

        with pytest.raises(RunLockedError, match=f"PID {holder.pid}"):
            flow.fn("tiny-random", ["tracking.backend=none"])
    finally:
        holder.send_signal(signal.SIGTERM)
        holder.wait()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipelines.yaml", "runs"]
