"""Run by tests/integration/test_distributed.py under ``torchrun --nproc_per_node 2``.

Trains the tiny pipeline in two CPU processes (gloo) and records, after every optimizer step,
a checksum of each process's trainable weights; each process writes what it saw to OUT/rankN.json.
With a 5th argument ``poison``, process 1 alone turns one gradient into NaN in its second backward
pass (train.nonfinite=skip): both processes must skip that update together. For nft (DiffusionNFT) the
run also keeps an EMA (train.ema_decay) and the checksum covers every kept copy of the weights (the old
policy, the KL reference, the EMA): each process moves its own copies, so they must stay equal too.
"""

import json
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import gather

from sdpo_core.config import load_config
from sdpo_core.training.callbacks import TrainerCallback
from sdpo_core.training.trainer import Trainer


def main(base: str, run_dir: str, out: str, method: str, poison: str = "") -> None:
    cfg = load_config(
        "tiny-random",
        [f"model.pretrained={base}", "tracking.backend=none", f"train.method={method}",
         "train.stat_tracking.buffer_size=64", "train.stat_tracking.min_count=2",
         *(["train.nonfinite=skip"] if poison else []),
         *(["train.ema_decay=0.9"] if method == "nft" else [])],
        Path(__file__).resolve().parents[2] / "pipelines.yaml",
    )
    acc = Accelerator(cpu=True)
    record: dict = {"checksums_equal": [], "skipped": []}

    class CheckSync(TrainerCallback):
        def on_optimizer_step(self, trainer: Trainer) -> None:
            total = sum(p.detach().double().sum() for p in trainer.trainable).reshape(1)
            both = gather(total)
            record["checksums_equal"].append(bool(torch.equal(both[0], both[1])))
            for name, snap in trainer.weights.snapshots.items():
                copy = gather(sum(t.double().sum() for t in snap.values()).reshape(1))
                record.setdefault("copies_equal", {}).setdefault(name, []).append(bool(torch.equal(copy[0], copy[1])))

        def on_run_start(self, trainer: Trainer, start_epoch: int) -> None:
            calls = [0]

            def hook(grad: torch.Tensor) -> torch.Tensor:
                calls[0] += 1
                return grad * float("nan") if calls[0] == 2 else grad

            if poison and acc.process_index == 1:
                trainer.trainable[0].register_hook(hook)

        def on_epoch_end(self, trainer: Trainer, epoch: int, metrics: dict) -> None:
            record["skipped"].append(metrics["nonfinite/skipped"])

    trainer = Trainer(cfg, run_dir, accelerator=acc, callbacks=[CheckSync()])
    trainer.run()
    record["world_size"] = acc.num_processes
    record["tracker_values"] = int(trainer.stat_tracker.count.sum()) if trainer.stat_tracker else -1
    record["samples_per_epoch"] = trainer.plan.samples_per_epoch
    record["final_sum"] = float(sum(p.detach().double().sum() for p in trainer.trainable))
    record["copy_sums"] = {n: float(sum(t.double().sum() for t in snap.values()))
                           for n, snap in trainer.weights.snapshots.items()}
    Path(out, f"rank{acc.process_index}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(*sys.argv[1:6])
