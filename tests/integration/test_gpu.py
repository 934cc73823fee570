"""The trainer on a CUDA device with bf16 autocast (skipped without a GPU)."""

import pytest
import torch

from sdpo_core.trainer import Trainer

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_trainer_on_cuda(tiny_cfg, tmp_path, precision):
    tr = Trainer(tiny_cfg(f"model.mixed_precision={precision}", "train.epochs=2"), tmp_path)
    assert tr.acc.device.type == "cuda"
    samples, _, _ = tr.sample_epoch(0)
    with torch.no_grad():
        _, info = tr._batch_loss(samples, torch.tensor([0, 1]), torch.tensor([0, 1]))
    # log-probs and ratios are float32 even under bf16 autocast: the ratio is 1 before updates
    assert info["approx_kl"].item() < (1e-10 if precision == "no" else 1e-6)
    before = {k: v.clone() for k, v in tr.trainable_state().items()}
    tr.run()
    after = tr.trainable_state()
    assert all(not torch.equal(before[k], after[k]) for k in before)
    assert all(torch.isfinite(v).all() for v in after.values())
