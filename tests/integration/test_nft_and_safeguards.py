"""DiffusionNFT's old policy, the KL to the reference (train.kl_beta) and the EMA (train.ema_decay) through
the real trainer on the tiny-random pipeline: what they change, what is exported, what a resume restores."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from sdpo_core.training.trainer import Trainer

PROMPTS = ["a handwritten digit 3", "the number seven", "an eight", "digit two"]


def _bump(tr: Trainer, by: float) -> None:
    with torch.no_grad():
        for p in tr.weights.params.values():
            p.add_(by)


def test_nft_samples_with_the_old_policy(tiny_cfg, tmp_path):
    # the paper samples with its old adapter: with the live weights moved away from the old copy, the
    # samples change only when the old copy does. catches: sampling with the live weights
    tr = Trainer(tiny_cfg("train.method=nft"), tmp_path)
    _bump(tr, 0.05)
    first = tr.sample_epoch(0).samples.x0_final[0]
    again = tr.sample_epoch(0).samples.x0_final[0]
    assert torch.equal(first, again)  # same epoch, same noise, same old weights
    tr.weights.blend("old", 1.0)  # old := the bumped live weights
    assert not torch.equal(tr.sample_epoch(0).samples.x0_final[0], first)


@pytest.mark.parametrize("method", ["sdpo", "ddpo", "grpo"])
def test_kl_beta_is_zero_at_the_start_then_changes_the_update(tiny_cfg, tmp_path, method):
    # catches: a reference that is not the weights training started from (KL > 0 before any update), a
    # KL that never reaches the loss (the same weights as kl_beta 0), a NaN from the closed form
    with_kl = Trainer(tiny_cfg(f"train.method={method}", "train.kl_beta=100", "train.learning_rate=1e-2"),
                      tmp_path / "kl", train_prompts=PROMPTS)
    samples = with_kl.sample_epoch(0).samples
    rows, steps = torch.arange(2), torch.zeros(2, dtype=torch.long)
    _, diag = with_kl.updater.batch_loss(samples, rows, steps)
    assert diag["kl_ref"].item() == 0.0
    metrics = with_kl.train_epoch(samples, 0)
    assert math.isfinite(metrics["kl_ref"]) and metrics["kl_ref"] > 0 and math.isfinite(metrics["loss"])
    plain = Trainer(tiny_cfg(f"train.method={method}", "train.learning_rate=1e-2"), tmp_path / "plain",
                    train_prompts=PROMPTS)
    plain.train_epoch(plain.sample_epoch(0).samples, 0)
    a, b = with_kl.trainable_state(), plain.trainable_state()
    assert any(not torch.equal(a[k], b[k]) for k in a)
    assert all(torch.isfinite(v).all() for v in a.values())


def test_ema_is_what_final_exports(tiny_cfg, tmp_path):
    # catches: final/ written from the raw weights, or the EMA left swapped in after the export
    tr = Trainer(tiny_cfg("train.ema_decay=0.5", "train.learning_rate=1e-2"), tmp_path, train_prompts=PROMPTS)
    final = tr.run()
    saved = load_file(str(final / "pytorch_lora_weights.safetensors"))
    ema = {v.numpy().tobytes() for v in tr.weights.snapshots["ema"].values()}
    raw = {v.numpy().tobytes() for v in tr.trainable_state().values()}
    assert len(saved) == len(ema) and all(v.numpy().tobytes() in ema for v in saved.values())
    assert any(v.numpy().tobytes() not in raw for v in saved.values())  # the EMA, not the raw weights
    assert {p.detach().numpy().tobytes() for p in tr.weights.params.values()} == raw  # live weights unchanged


def test_nft_with_ema_resumes_bit_exact(tiny_cfg, tmp_path):
    # the old policy and the EMA are training state: epoch 0, stop, resume == two epochs in one go.
    # catches: a copy left out of the checkpoint (it would restart from the resumed live weights)
    over = ("train.method=nft", "train.ema_decay=0.9", "train.async_checkpoint=false")
    whole = Trainer(tiny_cfg(*over, "train.epochs=2"), tmp_path / "whole", train_prompts=PROMPTS)
    whole.run()
    Trainer(tiny_cfg(*over, "train.epochs=1"), tmp_path / "split", train_prompts=PROMPTS).run()
    rest = Trainer(tiny_cfg(*over, "train.epochs=2"), tmp_path / "split", train_prompts=PROMPTS)
    rest.run(resume=True)
    a, b = whole.trainable_state(), rest.trainable_state()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert set(whole.weights.snapshots) == {"old", "reference", "ema"}
    for name, snap in whole.weights.snapshots.items():
        assert all(torch.equal(v, rest.weights.snapshots[name][k]) for k, v in snap.items()), name
