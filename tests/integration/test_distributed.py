"""Two CPU processes (gloo) through torchrun: no hang, gathered rewards, weights in sync."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from orchestration_testing import free_port  # a port from the OS on 127.0.0.1 (torchrun's port 0 hangs)

from sdpo_core.training.checkpoint import checkpoint_dirs

HERE = Path(__file__).resolve().parent


def _torchrun(base, tmp_path: Path, *args: str) -> list[dict]:
    """``dist_train.py BASE RUN OUT *args`` in two CPU processes (gloo); what each process recorded."""
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(HERE / "dist_train.py"), str(base), str(tmp_path / "run"), str(out),
           *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]



@pytest.mark.slow
# SDPO on the SD UNet under a launcher is tests/e2e/test_launchers.py's (the sdpo CLI, 2 and 3 processes):
# here each other family once, DDPO's per-prompt tracker on SDXL's UNet (its added conditioning)
@pytest.mark.parametrize("method,family", [("ddpo", "sdxl"), ("sdpo", "lcm"), ("sdpo", "sd3")])
def test_two_processes_stay_in_sync(tiny_base, tmp_path, method, family):
    # other families: tiny SDXL-Turbo / SD3 layouts, the family read from their model_index.json
    if family == "sdxl":
        from sdpo_core.tiny.families import build_tiny_sdxl

        tiny_base = build_tiny_sdxl(tmp_path / "sdxl")
    elif family == "lcm":
        from sdpo_core.tiny.families import build_tiny_lcm

        tiny_base = build_tiny_lcm(tmp_path / "lcm")
    elif family == "sd3":
        from sdpo_core.tiny.families import save_tiny
        from sdpo_core.tiny.flow import build_tiny_sd3

        tiny_base = save_tiny(build_tiny_sd3(seed=0), tmp_path / "sd3")
    ranks = _torchrun(tiny_base, tmp_path, method)
    for rec in ranks:
        assert rec["world_size"] == 2
        assert rec["checksums_equal"] and all(rec["checksums_equal"]), "weights diverged between processes"
    assert ranks[0]["final_sum"] == ranks[1]["final_sum"]
    # every process's stat tracker saw both processes' trajectories (gathered): 2 epochs x all samples
    # (DDPO tracks the final reward only, SDPO every step; the count is per prompt either way)
    expected = 2 * ranks[0]["samples_per_epoch"]
    assert ranks[0]["tracker_values"] == ranks[1]["tracker_values"] == expected
    # only the main process writes: one checkpoint per epoch, one final model
    assert [d.name for d in checkpoint_dirs(tmp_path / "run")] == ["epoch_0000", "epoch_0001"]
    assert (tmp_path / "run" / "final" / "pytorch_lora_weights.safetensors").is_file()


@pytest.mark.slow
def test_a_nan_gradient_in_one_process_is_skipped_by_both(tiny_base, tmp_path):
    """Process 1's gradient turns NaN in one backward: gradients are averaged, so both processes
    skip that update (train.nonfinite=skip) and their weights stay equal after every step
    (bugs caught: one process stepping while the other skips, a hang in the decision)."""
    ranks = _torchrun(tiny_base, tmp_path, "sdpo", "poison")
    for rec in ranks:
        assert rec["skipped"] == [1, 0]
        assert rec["checksums_equal"] and all(rec["checksums_equal"]), "weights diverged between processes"
    assert ranks[0]["final_sum"] == ranks[1]["final_sum"]


@pytest.mark.slow
def test_nft_keeps_its_weight_copies_equal_in_both_processes(tiny_base, tmp_path):
    """DiffusionNFT under two processes, with an EMA: sampling uses the old policy, the loss the old
    policy and the KL reference, export the EMA; each process moves its own copies after the (averaged)
    updates. Bugs caught: a copy updated from one process's weights only, a swap that leaves one
    process's live weights on a copy, a hang in the old policy's forward under DDP."""
    ranks = _torchrun(tiny_base, tmp_path, "nft")
    assert set(ranks[0]["copies_equal"]) == {"old", "reference", "ema"}
    for rec in ranks:
        assert rec["checksums_equal"] and all(rec["checksums_equal"]), "weights diverged between processes"
        for name, equal in rec["copies_equal"].items():
            assert len(equal) == len(rec["checksums_equal"]) and all(equal), f"copy {name!r} diverged"
    assert ranks[0]["final_sum"] == ranks[1]["final_sum"]
    assert ranks[0]["copy_sums"] == ranks[1]["copy_sums"]
    sums = ranks[0]["copy_sums"]
    # the copies did move (a LoRA starts with B = 0, so the sums of the reference are the initial ones)
    assert sums["old"] != sums["reference"] and sums["ema"] != sums["reference"]
    assert [d.name for d in checkpoint_dirs(tmp_path / "run")] == ["epoch_0000", "epoch_0001"]
    assert (tmp_path / "run" / "final" / "pytorch_lora_weights.safetensors").is_file()
