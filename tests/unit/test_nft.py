"""DiffusionNFT's maths (rl/nft.py) on hand-checkable tensors, the per-step Gaussian KL (rl/losses.py)
against a Monte-Carlo estimate, and the weight copies (training/weights.py): swap, blend, EMA."""

from __future__ import annotations

import math

import pytest
import torch

from sdpo_core.rl.losses import gaussian_kl
from sdpo_core.rl.nft import nft_loss, old_policy_decay, optimality_probability, output_distance
from sdpo_core.samplers.common import gaussian_log_prob
from sdpo_core.training.checkpoint import ResumeError
from sdpo_core.training.weights import PolicyWeights, ema_decay


def _one(v: float, grad: bool = False) -> torch.Tensor:
    return torch.tensor([[[[v]]]], requires_grad=grad)  # (1, 1, 1, 1): one item, one latent value


def test_optimality_probability_maps_clipped_advantages_to_0_1():
    # catches: a missing clip (r outside [0, 1]) or a wrong scale (A = c must give r = 1, A = 0 r = 1/2)
    a = torch.tensor([-10.0, -5.0, -2.5, 0.0, 2.5, 5.0, 10.0])
    assert optimality_probability(a, 5.0).tolist() == [0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0]


def test_nft_loss_by_hand():
    # x0 = 0, x0_old = 1, x0_new = 2, beta = 0.5:
    #   x0+ = 0.5 * 1 + 0.5 * 2 = 1.5 -> e+ = 2.25;  x0- = 1.5 * 1 - 0.5 * 2 = 0.5 -> e- = 0.25
    #   r = 0.75: loss = (0.75 * 2.25 + 0.25 * 0.25) / 0.5 = 3.5
    #   d loss / d x0_new = [0.75 * 2 * 1.5 * 0.5 + 0.25 * 2 * 0.5 * (-0.5)] / 0.5 = 2.0
    # catches: the mixing weights swapped between the policies, r weighing the wrong one, a missing / beta
    new = _one(2.0, grad=True)
    loss, info = nft_loss(new, _one(1.0), _one(0.0), torch.tensor([0.75]), 0.5, adaptive_weight=False)
    assert loss.item() == pytest.approx(3.5)
    assert info["nft/positive"].item() == pytest.approx(2.25) and info["nft/negative"].item() == pytest.approx(0.25)
    loss.backward()
    assert new.grad.item() == pytest.approx(2.0)
    # adaptive weighting: each error over its detached mean |error|: e+ = 2.25 / 1.5 = 1.5, e- = 0.25 / 0.5 = 0.5
    # -> (0.75 * 1.5 + 0.25 * 0.5) / 0.5 = 2.5
    loss, _ = nft_loss(_one(2.0), _one(1.0), _one(0.0), torch.tensor([0.75]), 0.5)
    assert loss.item() == pytest.approx(2.5)


def test_nft_loss_pulls_good_samples_in_and_pushes_bad_ones_out():
    # old = current (the first update): d loss / d x0_new = 2 (x0_new - x0) (2 r - 1) (beta cancels):
    # r = 1 moves x0_new toward the sample, r = 0 away from it, r = 1/2 not at all; the old
    # prediction gets no gradient. catches: a sign error in the negative policy, old not detached
    for r, want in ((1.0, 2.0), (0.0, -2.0), (0.5, 0.0)):
        new, old = _one(1.0, grad=True), _one(1.0, grad=True)
        loss, _ = nft_loss(new, old, _one(0.0), torch.tensor([r]), 0.1, adaptive_weight=False)
        loss.backward()
        assert new.grad.item() == pytest.approx(want, abs=1e-5) and old.grad is None


def test_nft_loss_averages_items_and_latent_dims():
    # two items of two latent values each, beta = 1 (x0+ = x0_new, x0- = 2 x0_old - x0_new), no adaptive weight:
    # item 0: new (1, 1), old (0, 0), x0 (0, 0), r 1 -> e+ = mean(1, 1) = 1 -> loss 1
    # item 1: new (0, 0), old (1, 3), x0 (0, 0), r 0 -> x0- = (2, 6), e- = mean(4, 36) = 20 -> loss 20
    new = torch.tensor([[1.0, 1.0], [0.0, 0.0]])[:, :, None, None]
    old = torch.tensor([[0.0, 0.0], [1.0, 3.0]])[:, :, None, None]
    loss, _ = nft_loss(new, old, torch.zeros_like(new), torch.tensor([1.0, 0.0]), 1.0, adaptive_weight=False)
    assert loss.item() == pytest.approx((1 + 20) / 2)


def test_old_policy_decay_schedules():
    # the paper's default (delay 0, rate 0.001, max 0.5) and its OCR schedule (75, 0.0075, 0.999)
    assert [old_policy_decay(s, 0, 0.001, 0.5) for s in (0, 100, 499, 2000)] == pytest.approx([0, 0.1, 0.499, 0.5])
    assert [old_policy_decay(s, 75, 0.0075, 0.999) for s in (10, 75, 175, 10**4)] == pytest.approx([0, 0, 0.75, 0.999])


def test_output_distance_is_a_mean_squared_difference():
    # (1 - 0)^2 and (3 - 1)^2 over one item's two values -> (1 + 4) / 2
    got = output_distance(torch.tensor([[1.0, 3.0]])[:, :, None, None], torch.tensor([[0.0, 1.0]])[:, :, None, None])
    assert got.item() == pytest.approx(2.5)


def test_gaussian_kl_by_hand_and_against_monte_carlo():
    # means (1, 0) vs (0, 0), std 0.5: per dim (1 / (2 * 0.25), 0) = (2, 0), averaged -> 1; std 0 -> 0
    mp, mq = torch.tensor([[1.0, 0.0]])[:, :, None, None], torch.zeros(1, 2, 1, 1)
    assert gaussian_kl(mp, mq, torch.full((1, 1, 1, 1), 0.5)).tolist() == [pytest.approx(1.0)]
    assert gaussian_kl(mp, mq, torch.zeros(1, 1, 1, 1)).tolist() == [0.0]
    # E_{x ~ p}[log p(x) - log q(x)] with the samplers' own log-density, 200k draws of 2 items x 4 dims
    gen = torch.Generator().manual_seed(0)
    mean_p, mean_q = torch.randn(2, 4, 1, 1, generator=gen), torch.randn(2, 4, 1, 1, generator=gen)
    std = torch.tensor([0.7, 1.3]).reshape(2, 1, 1, 1)
    n = 200_000
    x = mean_p + std * torch.randn(n, 2, 4, 1, 1, generator=gen)
    flat = lambda t: t.expand(n, 2, 4, 1, 1).reshape(2 * n, 4, 1, 1)  # noqa: E731
    log_ratio = gaussian_log_prob(x.reshape(2 * n, 4, 1, 1), flat(mean_p), flat(std)) - gaussian_log_prob(
        x.reshape(2 * n, 4, 1, 1), flat(mean_q), flat(std))
    mc = log_ratio.reshape(n, 2).double().mean(0)
    # standard error per item: sqrt(mean_d (dmu_d / std)^2 / 4 / n) < 3e-3 for these draws
    torch.testing.assert_close(mc.float(), gaussian_kl(mean_p, mean_q, std), atol=1e-2, rtol=0)
    assert not math.isclose(mc[0].item(), mc[1].item(), abs_tol=0.05)  # two different values, both matched


def _params():
    return {"a": torch.nn.Parameter(torch.tensor([1.0, 2.0])), "b": torch.nn.Parameter(torch.tensor([[3.0]]))}


def test_policy_weights_swap_in_and_back_bit_for_bit():
    params = _params()
    w = PolicyWeights(params, ["old"])
    with torch.no_grad():
        params["a"].add_(10.0)  # the live weights move on; the copy holds the start
    with w.use("old"):
        assert params["a"].tolist() == [1.0, 2.0]
    assert params["a"].tolist() == [11.0, 12.0] and w.snapshots["old"]["a"].tolist() == [1.0, 2.0]
    with w.use("current"):
        assert params["a"].tolist() == [11.0, 12.0]
    with pytest.raises(KeyError, match="reference"):
        with w.use("reference"):
            pass
    # a graph built while a copy was live cannot be back-propagated through the live weights silently
    with w.use("old"):
        y = (params["a"] * params["a"]).sum()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()


def test_policy_weights_blend_and_ema():
    params = _params()
    w = PolicyWeights(params, ["old"], ema_decay=0.9)
    with torch.no_grad():
        params["a"].copy_(torch.tensor([5.0, 6.0]))
    w.blend("old", 0.25)  # old <- old + 0.25 (live - old) = (1, 2) + 0.25 (4, 4) = (2, 3)
    assert w.snapshots["old"]["a"].tolist() == [2.0, 3.0]
    # the EMA's first step decays by min(0.9, 2 / 11): ema = (1, 2) + (9 / 11) ((5, 6) - (1, 2))
    assert ema_decay(0.9, 1) == pytest.approx(2 / 11) and ema_decay(0.9, 100) == 0.9
    w.after_optimizer_step(1)
    assert w.snapshots["ema"]["a"].tolist() == pytest.approx([1 + 36 / 11, 2 + 36 / 11])
    with w.exported():  # evaluation and export see the EMA
        assert params["a"].tolist() == pytest.approx([1 + 36 / 11, 2 + 36 / 11])


def test_policy_weights_state_round_trip_and_missing_copy():
    w = PolicyWeights(_params(), ["old"], ema_decay=0.5)
    state = w.state_dict()
    state["old"]["a"] += 1  # a CPU copy: the live snapshot is untouched
    assert w.snapshots["old"]["a"].tolist() == [1.0, 2.0]
    fresh = PolicyWeights(_params(), ["old"], ema_decay=0.5)
    fresh.load_state_dict(state, "ckpt")
    assert fresh.snapshots["old"]["a"].tolist() == [2.0, 3.0]
    with pytest.raises(ResumeError, match="'ema'.*checkpoint has none"):
        fresh.load_state_dict({"old": state["old"]}, "ckpt")
