"""configs/accelerate/: each file is read by accelerate's own config loader (what `accelerate launch
--config_file` reads) and says what its name and the README say; tests/integration/test_fsdp.py
launches the FSDP one for real."""

import re
from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.utils import DistributedType

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs" / "accelerate"
EXPECTED = {  # name: (distributed type, processes, machines)
    "one_gpu.yaml": (DistributedType.NO, 1, 1),
    "ddp_8gpu.yaml": (DistributedType.MULTI_GPU, 8, 1),
    "fsdp_8gpu.yaml": (DistributedType.FSDP, 8, 1),
    "ddp_2nodes_8gpu.yaml": (DistributedType.MULTI_GPU, 16, 2),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_accelerate_reads_each_config(name):
    cfg = load_config_from_file(str(CONFIGS / name))
    assert (cfg.distributed_type, cfg.num_processes, cfg.num_machines) == EXPECTED[name]
    assert not cfg.use_cpu
    # precision is the pipeline's model.mixed_precision (the trainer passes it to Accelerator())
    assert cfg.mixed_precision == "no"
    if cfg.distributed_type == DistributedType.FSDP:
        # FSDP2 (the trainer refuses FSDP1), one unit per _no_split_modules block, sharded checkpoints
        f = cfg.fsdp_config
        assert f["fsdp_version"] == 2 and f["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
        assert f["fsdp_state_dict_type"] == "SHARDED_STATE_DICT" and f["fsdp_reshard_after_forward"] is True
    else:
        assert not cfg.fsdp_config


def test_every_config_is_in_the_readme_and_every_one_named_there_exists():
    named = set(re.findall(r"configs/accelerate/([\w.]+\.yaml)", (ROOT / "README.md").read_text()))
    assert named == {p.name for p in CONFIGS.glob("*.yaml")} == set(EXPECTED)
