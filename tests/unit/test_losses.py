"""SDPO and DDPO losses on hand-checkable values."""

import pytest
import torch

from sdpo_core.rl.losses import ddpo_loss, sdpo_loss, temporal_weights


def test_temporal_weights():
    # lam^t / log_scale: 0.5^[0,1,2] / 2 = [0.5, 0.25, 0.125]
    torch.testing.assert_close(temporal_weights(3, 0.5, 2.0), torch.tensor([0.5, 0.25, 0.125]))


def test_sdpo_loss_unclipped_by_hand():
    # pair log-ratios: traj1 +0.2, traj2 -0.1 -> diff 0.3; weight 2 -> 0.6; A1 - A2 = 1 - 0 = 1
    # loss = (0.6 - 1)^2 = 0.16
    z = torch.zeros(1)
    loss, info = sdpo_loss(z + 0.2, z, z - 0.1, z, z + 1, z, torch.tensor([2.0]), clip_range=0, adv_clip_max=5)
    assert loss.item() == pytest.approx(0.16)
    assert info["clipfrac"].item() == 0
    # approx_kl = 1/4 (0.2^2 + 0.1^2) = 0.0125
    assert info["approx_kl"].item() == pytest.approx(0.0125)


def test_sdpo_loss_clipped_takes_max():
    # clip 0.05: clipped ratios 0.05 and -0.05 -> diff 0.1, weight 1 -> (0.1 - 1)^2 = 0.81;
    # unclipped (0.3 - 1)^2 = 0.49 -> max 0.81, clipfrac 1
    z = torch.zeros(1)
    loss, info = sdpo_loss(z + 0.2, z, z - 0.1, z, z + 1, z, torch.ones(1), clip_range=0.05, adv_clip_max=5)
    assert loss.item() == pytest.approx(0.81)
    assert info["clipfrac"].item() == 1.0


def test_sdpo_loss_advantage_clipping():
    # A1 = 10 clipped to 5, A2 = -10 clipped to -5: target 10; no ratio change: loss 100
    z = torch.zeros(2)
    loss, info = sdpo_loss(z, z, z, z, z + 10, z - 10, torch.ones(2), clip_range=0, adv_clip_max=5)
    assert loss.item() == pytest.approx(100.0)
    assert info["adv_clipfrac"].item() == 1.0


def test_sdpo_gradient_moves_ratio_towards_advantage_difference():
    lp1 = torch.zeros(1, requires_grad=True)
    loss, _ = sdpo_loss(lp1, torch.zeros(1), torch.zeros(1), torch.zeros(1), torch.ones(1), torch.zeros(1),
                        torch.ones(1), clip_range=0, adv_clip_max=5)
    loss.backward()
    assert lp1.grad.item() == pytest.approx(-2.0)  # d/dx (x - 1)^2 at 0; descent raises logp1


def test_ddpo_loss_by_hand():
    # ratio exp(0) = 1: loss = mean(-A) = -(1 + -2)/2 = 0.5
    z = torch.zeros(2)
    loss, info = ddpo_loss(z, z, torch.tensor([1.0, -2.0]), clip_range=0.1, adv_clip_max=5)
    assert loss.item() == pytest.approx(0.5)
    # ratio e^0.5 = 1.6487 with A = 1: unclipped -1.6487, clipped -1.1 -> max = -1.1
    loss, info = ddpo_loss(torch.tensor([0.5]), torch.zeros(1), torch.ones(1), clip_range=0.1, adv_clip_max=5)
    assert loss.item() == pytest.approx(-1.1)
    assert info["clipfrac"].item() == 1.0
