"""The real `sdpo` command under the real launchers: `torchrun` (one machine; two "machines" on
127.0.0.1 with a c10d rendezvous) and `accelerate launch --multi_gpu`, on CPU processes (gloo).

What each launch checks, and the bug that would fail it:
- torchrun, 2 processes, `sdpo -v run` with MLflow: one MLflow run per stage (two ranks each making
  one, or racing to create the store's schema); the train run's metrics are the mean of both
  ranks' own (rank 0's alone logged); every rank ends with the weights of the last checkpoint
  (ranks drifting apart, a checkpoint of something else); the evaluation is shared (rank 1 samples
  half of it) and equals one process's evaluation bit for bit (a batch split or put back in the
  wrong order); eval.json written once.
- accelerate launch, 3 processes, `sdpo -v train` with MLflow: the same for 3 ranks.
- two torchrun launchers (2 "nodes"), SIGTERM to both mid-run: one message naming the last
  checkpoint, no sdpo traceback; resuming on the two nodes ends with the uninterrupted 2-process
  weights, bit for bit (a lost or replayed epoch); log lines appear once (every rank logging).
- two launchers given different run dirs: one line that says the run dir is not shared, nothing
  left behind (ranks training apart, each on its own files).
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from orchestration_testing import free_port  # a port from the OS on 127.0.0.1 (torchrun's port 0 hangs)
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
EPOCHS = 8  # long enough that a SIGTERM sent after the first checkpoint lands mid-run
TIMEOUT = 600
EVAL = [
    "evaluate.num_prompts=2",
    "evaluate.samples_per_prompt=2",
    "evaluate.batch_size=2",
    "evaluate.metrics=[diversity]",
]  # 2 batches: one per rank; diversity sees all 4 images at once



def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), **extra}


def torchrun(*launcher: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *launcher, "-m", "sdpo_core.cli"]


def two_nodes(rdzv_id: str) -> list[list[str]]:
    """Two torchrun launchers, one process each, meeting at a c10d rendezvous on 127.0.0.1."""
    endpoint = f"127.0.0.1:{free_port()}"
    return [
        torchrun(
            "--nnodes",
            "2",
            "--nproc-per-node",
            "1",
            "--rdzv-backend",
            "c10d",
            "--rdzv-endpoint",
            endpoint,
            "--rdzv-id",
            rdzv_id,
        )
        for _ in range(2)
    ]


def tiny(base: Path, run_dir: Path, *overrides: str) -> list[str]:
    sets = [f"model.pretrained={base}", f"train.epochs={EPOCHS}", *overrides]
    return ["--pipeline", "tiny-random", "--run-dir", str(run_dir), *[a for s in sets for a in ("--set", s)]]


@contextmanager
def launched(*cmds: list[str], env: dict[str, str]):
    """Start the launchers; on the way out, stop whatever still runs: SIGTERM to a launcher (it stops
    its workers, which run in sessions of their own), SIGKILL to it and its workers if that hangs."""
    import psutil

    procs = [
        subprocess.Popen(c, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for c in cmds
    ]
    try:
        yield procs
    finally:
        for p in procs:
            if p.poll() is None:
                workers = psutil.Process(p.pid).children(recursive=True)
                p.send_signal(signal.SIGTERM)
                try:
                    p.communicate(timeout=60)
                except subprocess.TimeoutExpired:
                    for w in [*workers, p]:
                        try:
                            w.kill()
                        except (psutil.NoSuchProcess, ProcessLookupError):
                            pass
                    p.communicate()


def finish(procs: list[subprocess.Popen]) -> list[tuple[int, str, str]]:
    """(exit status, stdout, stderr) of each launcher, once it ends."""
    deadline = time.monotonic() + TIMEOUT
    outs = [p.communicate(timeout=max(1.0, deadline - time.monotonic())) for p in procs]
    return [(p.returncode, out, err) for p, (out, err) in zip(procs, outs, strict=True)]


def rank_lines(stderr: str, pattern: str) -> dict[int, list[str]]:
    """rank -> the captured groups of debug lines ``rank R: <pattern>``."""
    out: dict[int, list[str]] = {}
    for m in re.finditer(rf"rank (\d+): {pattern}", stderr):
        out.setdefault(int(m.group(1)), []).append(m.group(2))
    return out


def check_ranks_agree(run_dir: Path, stderr: str, n: int) -> None:
    """Every rank's weights at the end are the last checkpoint's (sha256 of the same tensors)."""
    from sdpo_core.training.checkpoint import latest_checkpoint, load_checkpoint
    from sdpo_core.training.distributed import weights_digest

    digests = rank_lines(stderr, r"trained weights sha256 (\w+)")
    saved = weights_digest(load_checkpoint(latest_checkpoint(run_dir)).weights)
    assert digests == {r: [saved] for r in range(n)}


def check_gathered_metrics(client, run_id: str, stderr: str, n: int, epochs: int) -> None:
    """The run's metrics are the mean over the n ranks of what each measured (time/*: the maximum)."""
    per_rank = {
        r: [json.loads(x) for x in lines]
        for r, lines in rank_lines(stderr, r"epoch metrics of this rank (\{.*\})").items()
    }
    assert sorted(per_rank) == list(range(n)) and all(len(v) == epochs for v in per_rank.values())
    for key, combine in (("loss", lambda v: math.fsum(v) / n), ("time/epoch", max)):
        logged = {m.step: m.value for m in client.get_metric_history(run_id, key)}
        assert logged == {e: combine([per_rank[r][e][key] for r in range(n)]) for e in range(epochs)}, key
    assert len({per_rank[r][0]["loss"] for r in range(n)}) > 1, "the ranks' losses are equal: nothing tested"


def mlflow_runs(store: Path):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{store}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    return client, {r.info.run_name: r for r in runs}


# ------------------------------------------------------------------------------------ the launches
@pytest.fixture(scope="module")
def straight(tiny_base, tmp_path_factory):
    """`sdpo -v run` on 2 processes under torchrun with MLflow: the uninterrupted 2-process run."""
    tmp = tmp_path_factory.mktemp("straight")
    cmd = [
        *torchrun("--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port", str(free_port())),
        "-v",
        "run",
        *tiny(tiny_base, tmp / "run", *EVAL),
    ]
    with launched(cmd, env=_env(MLFLOW_TRACKING_URI=f"sqlite:///{tmp / 'mlflow.db'}")) as procs:
        ((code, out, err),) = finish(procs)
    assert code == 0, err[-4000:]
    return tmp, out, err


@pytest.mark.slow
def test_sdpo_run_under_torchrun_tracks_once_and_shares_the_evaluation(tiny_base, straight):
    from sdpo_core.config import load_config
    from sdpo_core.evaluation.evaluate import evaluate
    from sdpo_core.prompts import load_split

    tmp, out, err = straight
    client, runs = mlflow_runs(tmp / "mlflow.db")
    assert sorted(runs) == ["tiny-random-evaluate", "tiny-random-train"]
    assert {r.info.status for r in runs.values()} == {"FINISHED"}
    check_gathered_metrics(client, runs["tiny-random-train"].info.run_id, err, 2, EPOCHS)
    check_ranks_agree(tmp / "run", err, 2)
    assert out.count("run time:") == 1  # the summary, printed by rank 0 alone
    # the evaluation: shared (rank 1 sampled a batch), written once, equal to one process's
    shares = rank_lines(err, r"eval \w+ samples the batches starting at (\[[\d, ]*\])")
    assert json.loads(shares[1][0]) == [2], shares
    assert err.count("evaluation written to") == 1
    written = json.loads((tmp / "run" / "eval" / "eval.json").read_text())
    cfg = load_config(
        "tiny-random",
        [f"model.pretrained={tiny_base}", f"train.epochs={EPOCHS}", *EVAL],
        ROOT / "pipelines.yaml",
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the launched processes (OMP_NUM_THREADS=1)
    try:
        alone = evaluate(
            cfg,
            str(tiny_base),
            str(tmp / "run" / "final"),
            load_split(tmp / "run" / "prompts").eval,
            tmp / "alone",
        )
    finally:
        torch.set_num_threads(threads)
    assert written["steps"] == json.loads(json.dumps(alone["steps"]))


@pytest.mark.slow
def test_accelerate_launch_three_processes_track_once(tiny_base, tmp_path):
    store = tmp_path / "mlflow.db"
    cmd = [
        "accelerate",
        "launch",
        "--multi_gpu",
        "--num_processes",
        "3",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_ip",
        "127.0.0.1",
        "--main_process_port",
        str(free_port()),
        "-m",
        "sdpo_core.cli",
        "-v",
        "train",
        *tiny(tiny_base, tmp_path / "run", "train.epochs=2"),
    ]
    cmd[0] = str(Path(sys.executable).with_name("accelerate"))
    # HF_HOME: no accelerate config file of the user's changes the launch
    with launched(
        cmd, env=_env(MLFLOW_TRACKING_URI=f"sqlite:///{store}", HF_HOME=str(tmp_path / "hf"))
    ) as procs:
        ((code, out, err),) = finish(procs)
    assert code == 0, err[-4000:]
    client, runs = mlflow_runs(store)
    assert list(runs) == ["tiny-random-train"]
    check_gathered_metrics(client, runs["tiny-random-train"].info.run_id, err, 3, 2)
    check_ranks_agree(tmp_path / "run", err, 3)
    assert out.count("trained weights:") == 1


@pytest.mark.slow
def test_two_nodes_stopped_and_resumed_match_the_straight_run(tiny_base, tmp_path, straight):
    from sdpo_core.training.checkpoint import latest_checkpoint

    run = tmp_path / "run"
    args = tiny(tiny_base, run, "tracking.backend=none")
    with launched(*[[*c, "train", *args] for c in two_nodes("stopped")], env=_env()) as procs:
        first = run / "checkpoints" / "epoch_0000" / "manifest.json"
        deadline = time.monotonic() + TIMEOUT
        while not first.is_file():
            assert all(p.poll() is None for p in procs), "a launcher ended before the first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint in time"
            time.sleep(0.02)
        for p in procs:  # both machines' launchers: each forwards it to its workers
            p.send_signal(signal.SIGTERM)
        stopped = finish(procs)
    assert all(code != 0 for code, _, _ in stopped)
    err = "".join(e for _, _, e in stopped)
    latest = latest_checkpoint(run)
    assert latest is not None and int(latest.name.split("_")[1]) < EPOCHS - 1, "finished before the signal"
    assert err.count("interrupted by SIGTERM") == 1 and f"the last complete checkpoint is {latest}" in err
    assert not re.search(r'File ".*sdpo_core', err), err[-4000:]  # torchrun's own traceback only
    assert not (run / "final").exists() and not (run / ".lock").exists()

    with launched(*[[*c, "train", *args, "--resume"] for c in two_nodes("resumed")], env=_env()) as procs:
        resumed = finish(procs)
    assert [code for code, _, _ in resumed] == [0, 0], resumed[0][2][-3000:] + resumed[1][2][-3000:]
    a = load_file(straight[0] / "run" / "final" / "pytorch_lora_weights.safetensors")
    b = load_file(run / "final" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "resumed on two nodes differs"
    assert len((run / "train_metrics.jsonl").read_text().splitlines()) == EPOCHS
    # one writer of logs and results: rank 0's lines once, the other rank silent (no warning here)
    out, err = "".join(o for _, o, _ in resumed), "".join(e for _, _, e in resumed)
    assert err.count(f"INFO sdpo_core.training.trainer: epoch {EPOCHS - 1}: ") == 1
    assert out.count("trained weights:") == 1
    assert "[rank 1]" not in err


@pytest.mark.slow
def test_two_nodes_without_a_shared_run_dir_fail_in_one_line(tiny_base, tmp_path):
    dirs = [tmp_path / "node0", tmp_path / "node1"]
    # `sdpo prepare`: every stage checks the run dir first, this one before it imports diffusers
    cmds = [[*c, "prepare", *tiny(tiny_base, d)] for c, d in zip(two_nodes("apart"), dirs, strict=True)]
    with launched(*cmds, env=_env()) as procs:
        results = finish(procs)
    assert all(code != 0 for code, _, _ in results)
    errors = [
        line for _, _, e in results for line in e.splitlines() if re.match(r"(\[rank \d+\] )?error: ", line)
    ]
    assert len(errors) == 1 and errors[0].startswith("error: run dir "), errors
    assert "is not shared between the nodes" in errors[0] and "shared" in errors[0].rsplit(";", 1)[1]
    assert not any(d.exists() for d in dirs)  # nothing trained, nothing left behind
