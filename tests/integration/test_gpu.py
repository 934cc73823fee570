"""The trainer on a CUDA device with bf16 autocast (skipped without a GPU)."""

import pytest
import torch

from sdpo_core.training.trainer import Trainer

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_trainer_on_cuda(tiny_cfg, tmp_path, precision, request):
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # one process, two precisions
    request.addfinalizer(lambda: AcceleratorState._reset_state(reset_partial_state=True))
    tr = Trainer(tiny_cfg(f"model.mixed_precision={precision}", "train.epochs=2"), tmp_path)
    assert tr.acc.device.type == "cuda"
    samples = tr.sample_epoch(0).samples
    before = {k: v.clone() for k, v in tr.trainable_state().items()}
    metrics = tr.train_epoch(samples, 0)
    # the first batch is scored before any update: the ratio is 1 (bf16: thanks to the recompute)
    assert metrics["check/first_batch_kl"] < 1e-10
    tr.run(resume=True)
    after = tr.trainable_state()
    assert all(not torch.equal(before[k], after[k]) for k in before)
    assert all(torch.isfinite(v).all() for v in after.values())
