"""samplers/common.py: the Gaussian log-prob, noise draw and step-index check every sampler shares."""

import math

import pytest
import torch

from sdpo_core.samplers.common import gaussian_log_prob, per_item, step_indices, step_noise


def test_gaussian_log_prob_by_hand():
    # item 0: x = mean, std 1 -> log N = -0.5 log(2 pi) at every entry
    # item 1: x - mean = 2, std 2 -> -(4 / 8) - log 2 - 0.5 log(2 pi)
    x = torch.tensor([[0.0, 0.0], [3.0, 3.0]]).reshape(2, 2, 1, 1)
    mean = torch.tensor([[0.0, 0.0], [1.0, 1.0]]).reshape(2, 2, 1, 1)
    std = torch.tensor([1.0, 2.0]).reshape(2, 1, 1, 1)
    half_log_2pi = 0.5 * math.log(2 * math.pi)
    expected = torch.tensor([-half_log_2pi, -0.5 - math.log(2.0) - half_log_2pi])
    # catches: a sum over latent dims instead of the mean, a missing log(std), std for the variance
    torch.testing.assert_close(gaussian_log_prob(x, mean, std), expected)


def test_gaussian_log_prob_point_mass_and_gradients():
    x = torch.randn(2, 3, 2, 2)
    mean = torch.randn(2, 3, 2, 2, requires_grad=True)
    x.requires_grad_(True)
    std = torch.tensor([0.0, 0.5]).reshape(2, 1, 1, 1)
    lp = gaussian_log_prob(x, mean, std)
    # catches: a zero std giving inf / NaN instead of the point mass's 0
    assert lp[0] == 0 and torch.isfinite(lp).all()
    lp.sum().backward()
    # catches: gradients through the stored sample (it is data) or into the point-mass item's mean
    assert x.grad is None
    assert torch.equal(mean.grad[0], torch.zeros_like(mean.grad[0])) and mean.grad[1].abs().sum() > 0


def test_per_item_and_step_indices():
    like = torch.zeros(3, 4, 2, 2, dtype=torch.float16)
    out = per_item(torch.tensor([1, 2, 3]), like)
    assert out.shape == (3, 1, 1, 1) and out.dtype == torch.float32
    assert step_indices(torch.tensor(1), 3, 2).tolist() == [1, 1, 1]  # a scalar applies to every item
    assert step_indices(torch.tensor([0, 1]), 2, 2).tolist() == [0, 1]
    # catches: an off-by-one letting the step after the last through
    with pytest.raises(IndexError, match="step_index .* out of range for 2 steps"):
        step_indices(torch.tensor([0, 2]), 2, 2)
    with pytest.raises(IndexError, match="out of range"):
        step_indices(-1, 1, 2)


def test_step_noise_given_or_drawn_from_the_generator():
    x = torch.zeros(2, 3, 2, 2)
    given = torch.randn(2, 3, 2, 2, dtype=torch.float64)
    assert torch.equal(step_noise(x, None, given), given.float())  # the caller's noise wins
    drawn = step_noise(x, torch.Generator().manual_seed(5))
    # catches: a draw that is not the generator's stream (sampling not reproducible from a seed)
    assert torch.equal(drawn, torch.randn(2, 3, 2, 2, generator=torch.Generator().manual_seed(5)))
