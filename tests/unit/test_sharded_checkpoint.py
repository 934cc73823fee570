"""A sharded (FSDP) checkpoint's files: every process's shard under the manifest, verified one by
one, and a resume that refuses a launch of the other kind (tests/integration/test_fsdp.py trains)."""

import json
from pathlib import Path

import pytest
import torch

from sdpo_core.training.checkpoint import (
    CheckpointState,
    ResumeError,
    load_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)
from sdpo_core.training.run_state import check_sharding

SHARDS = {"__0_0.distcp": b"a" * 100, "__1_0.distcp": b"b" * 100, ".metadata": b"m" * 10}


def test_every_shard_is_in_the_manifest_and_verified(tmp_path):
    # what write_shards leaves before the main process completes the checkpoint
    shards = tmp_path / "checkpoints" / "epoch_0000.tmp" / "sharded"
    shards.mkdir(parents=True)
    for name, data in SHARDS.items():
        (shards / name).write_bytes(data)
    state = CheckpointState(epoch=0, global_step=3, weights=None, optimizer=None, tracker=None,
                            rng={"torch": torch.get_rng_state()}, config_yaml="seed: 1\n", sharded=True)
    final = save_checkpoint(tmp_path, state, keep=2)

    files = json.loads((final / "manifest.json").read_text())["files"]
    assert {f"sharded/{n}" for n in SHARDS} <= set(files) and "weights.safetensors" not in files
    assert verify_checkpoint(final) is None
    loaded = load_checkpoint(final)
    assert loaded.sharded and loaded.weights is None and loaded.optimizer is None and loaded.global_step == 3
    # one process's shard cut short is caught (bug: a manifest of the top-level files only)
    (final / "sharded" / "__1_0.distcp").write_bytes(b"b" * 50)
    assert verify_checkpoint(final) == "sharded/__1_0.distcp has 50 bytes, the manifest says 100 (truncated or overwritten)"


def test_a_sharded_checkpoint_resumes_only_under_fsdp_and_an_unsharded_one_only_without():
    path = Path("run/checkpoints/epoch_0003")
    check_sharding(path, True, True)
    check_sharding(path, False, False)
    with pytest.raises(ResumeError, match=r"by every process of an FSDP run: resume it with an FSDP accelerate config"):
        check_sharding(path, True, False)
    with pytest.raises(ResumeError, match=r"by a run without FSDP: resume it without FSDP"):
        check_sharding(path, False, True)


def test_weight_copies_are_refused_under_fsdp_only():
    """NFT's old policy, the KL reference and the EMA are whole copies kept by the main process: under
    FSDP a process holds only its shard, so training refuses them there (bug: a checkpoint of rank 0's
    shard saved as the EMA) and accepts them unsharded."""
    from sdpo_core.config import ConfigError
    from sdpo_core.training.sharding import check_weight_copies

    with pytest.raises(ConfigError, match=r"\(old, ema: .*not supported under FSDP"):
        check_weight_copies(True, ["old", "ema"])
    check_weight_copies(False, ["old", "ema"])
    check_weight_copies(True, [])
