"""Run by tests/integration/test_fsdp.py under ``accelerate launch --config_file
configs/accelerate/fsdp_8gpu.yaml --num_processes 2`` (gloo, CPU).

The launcher sets the FSDP environment from the shipped config (ACCELERATE_USE_FSDP, FSDP_VERSION=2,
FSDP_AUTO_WRAP_POLICY, ...), from which ``Accelerator()`` builds its FSDP plugin. But accelerate 1.15
turns FSDP on only for accelerator devices (its ``AcceleratorState`` picks FSDP out of MULTI_GPU /
NPU / XPU / ..., never MULTI_CPU), so on the CPU this script sets the distributed type itself, with
the plugin built from that environment as ``Accelerator()`` builds it. Everything after that is what
a GPU run executes: accelerate's FSDP2 ``prepare`` (``fully_shard`` per block), the trainer, DCP
checkpoints, the gathers.

For each of ``model.finetune`` lora and full, in one process group: run A trains 2 epochs; run B
trains 1 epoch (a sharded checkpoint), then a new trainer resumes B to 2 epochs. Each process writes
OUT/rank{i}.json; the main process also OUT/{finetune}_a.safetensors (A's gathered weights).
"""

import json
import os
import sys
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from safetensors.torch import load_file, save_file
from torch.distributed.tensor import DTensor

from sdpo_core.config import load_config
from sdpo_core.training.trainer import Trainer


def fsdp_accelerator() -> Accelerator:
    assert os.environ.get("ACCELERATE_USE_FSDP") == "true", "start me with accelerate launch and an FSDP config"
    plugin = FullyShardedDataParallelPlugin()  # from the launcher's environment, as Accelerator() does
    acc = Accelerator(cpu=True, fsdp_plugin=plugin)
    # see the module docstring; both states, as AcceleratorState's own init does (a later
    # AcceleratorState() copies PartialState's distributed type over its own)
    acc.state.distributed_type = PartialState().distributed_type = DistributedType.FSDP
    acc.state.fsdp_plugin = plugin
    return acc


def main(base: str, root: str, out: str) -> None:
    acc = fsdp_accelerator()
    record: dict = {"world_size": acc.num_processes}
    for finetune in ("lora", "full"):
        def cfg(epochs: int, finetune: str = finetune):
            return load_config(
                "tiny-random",
                [f"model.pretrained={base}", "tracking.backend=none", f"model.finetune={finetune}",
                 f"train.epochs={epochs}"],
                Path(__file__).resolve().parents[2] / "pipelines.yaml",
            )

        a = Trainer(cfg(2), Path(root, finetune, "a"), accelerator=acc)
        a.run()
        whole_a = a.trainable_state()  # gathered on the main process
        acc.free_memory()  # one trainer per accelerator, as in a real run (accelerate keeps every prepared model)
        Trainer(cfg(1), Path(root, finetune, "b"), accelerator=acc).run()
        acc.free_memory()
        b = Trainer(cfg(2), Path(root, finetune, "b"), accelerator=acc)
        b.run(resume=True)
        whole_b = b.trainable_state()
        shards = [p for p in b.trainable if isinstance(p, DTensor)]
        record[finetune] = {
            "sharded_params": len(shards), "trainable_params": len(b.trainable),
            "local_numel": sum(p.to_local().numel() for p in shards),
            "global_numel": sum(p.numel() for p in shards),
            "gathered_keys": len(whole_a),
        }
        if acc.is_main_process:
            record[finetune]["resume_equal"] = sorted(whole_a) == sorted(whole_b) and all(
                torch.equal(whole_a[k], whole_b[k]) for k in whole_a)
            record[finetune]["changed"], record[finetune]["compared"] = _changed(a, whole_a)
            save_file({k: v.contiguous() for k, v in whole_a.items()}, str(Path(out, f"{finetune}_a.safetensors")))
        acc.free_memory()
    Path(out, f"rank{acc.process_index}.json").write_text(json.dumps(record))


def _changed(trainer: Trainer, weights: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(tensors that training moved from their start, tensors compared): LoRA's B matrices start at
    zero; a full fine-tune's weights start at the base model's."""
    if trainer.cfg.model.finetune == "lora":
        start = {k: torch.zeros_like(v) for k, v in weights.items() if "lora_B" in k}
    else:
        start = load_file(str(Path(trainer.cfg.model.pretrained, "unet", "diffusion_pytorch_model.safetensors")))
    return sum(not torch.equal(weights[k], v) for k, v in start.items()), len(start)


if __name__ == "__main__":
    main(*sys.argv[1:4])
