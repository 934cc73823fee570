"""Anchor choice and similarity-weighted dense reward prediction on hand-made latents."""

import pytest
import torch

from sdpo_core.rl.dense_rewards import predict_dense_rewards, query_steps, similarities


def _x0(vectors):
    """(T, D) list -> (1, T, D, 1, 1) latents."""
    return torch.tensor(vectors, dtype=torch.float32)[None, :, :, None, None]


def test_anchor_is_least_similar_to_both_ends():
    # T=4 steps of 2-d x0: first (1,0), last (0,1); step 1 is (1,1) (45 deg from both:
    # cos sum 1.414), step 2 is (-1, 0) (cos -1 to first, 0 to last: sum -1) -> anchor 2.
    anchor, sims = similarities(_x0([[1, 0], [1, 1], [-1, 0], [0, 1]]))
    assert anchor.tolist() == [2]
    # similarities of every step to (first, anchor, last)
    s = 2**-0.5
    expected = torch.tensor([[[1, -1, 0], [s, -s, s], [-1, 1, 0], [0, 0, 1]]], dtype=torch.float32)
    torch.testing.assert_close(sims, expected)
    assert query_steps(anchor, 4).tolist() == [[0, 2, 3]]


def test_dense_prediction_by_hand():
    # one trajectory, T=3, anchor = 1; measured rewards first 1.0, anchor 2.0, last 4.0.
    sims = torch.tensor([[[1.0, 0.5, 0.2], [0.5, 1.0, 0.5], [0.2, 0.5, 1.0]]])
    r = torch.tensor([[1.0, 2.0, 4.0]])
    dense = predict_dense_rewards(r, sims, torch.tensor([1]))
    # every step here is queried, so the measured values are kept: [1, 2, 4]
    assert dense.tolist() == [[1.0, 2.0, 4.0]]


def test_unqueried_step_is_weighted_mix():
    # T=4, anchor 1: step 2 is not queried; sims to (first, anchor, last) = (0.2, 0.6, 0.2)
    # -> (0.2*1 + 0.6*2 + 0.2*4) / 1.0 = 2.2
    sims = torch.tensor([[[1, 0, 0], [0, 1, 0], [0.2, 0.6, 0.2], [0, 0, 1.0]]])
    dense = predict_dense_rewards(torch.tensor([[1.0, 2.0, 4.0]]), sims, torch.tensor([1]))
    torch.testing.assert_close(dense, torch.tensor([[1.0, 2.0, 2.2, 4.0]]))
    # no anchor: step 1's weights to (first, last) are (0, 0) here: no prediction, an error (it was NaN)
    with pytest.raises(ValueError, match="not finite at 1 of 4"):
        predict_dense_rewards(torch.tensor([[1.0, 2.0, 4.0]]), sims, torch.tensor([1]), use_anchor=False)
    # with step 1 similar (0.5, 0.5) to the ends: (0.5*1 + 0.5*4) / 1 = 2.5; step 2: (0.2*1 + 0.2*4) / 0.4 = 2.5
    sims[0, 1] = torch.tensor([0.5, 1.0, 0.5])
    no_anchor = predict_dense_rewards(torch.tensor([[1.0, 2.0, 4.0]]), sims, torch.tensor([1]), use_anchor=False)
    assert no_anchor[0, 1].item() == 2.5 and no_anchor[0, 2].item() == 2.5
    assert no_anchor[0, 0].item() == 1.0 and no_anchor[0, 3].item() == 4.0
    # sparse ablation: the final reward everywhere
    sparse = predict_dense_rewards(torch.tensor([[1.0, 2.0, 4.0]]), sims, torch.tensor([1]), dense=False)
    assert sparse.tolist() == [[4.0] * 4]


def test_one_step_trajectory():
    anchor, sims = similarities(torch.randn(3, 1, 4, 2, 2))
    assert anchor.tolist() == [0, 0, 0]
    r = torch.tensor([[0.5, 0.5, 0.5]] * 3)
    assert predict_dense_rewards(r, sims, anchor).tolist() == [[0.5]] * 3


def test_weights_summing_to_zero_raise_instead_of_dividing():
    # step 1 of 3 is similar +0.5 to first and -0.5 to last (anchor is step 0 here, so its weight is
    # the first's): weights (0.5, 0.5, -1.0) sum to 0 -> r_1 would be x / 0
    sims = torch.tensor([[[1.0, 1.0, 0.2], [0.5, 0.5, -1.0], [0.2, 0.2, 1.0]]])
    r = torch.tensor([[1.0, 1.0, 3.0]])
    with pytest.raises(ValueError, match="not finite at 1 of 3"):
        predict_dense_rewards(r, sims, torch.tensor([0]))
    # a sum of 1e-9 is as bad: finite, but a reward of ~1e9
    sims[0, 1, 2] = -1.0 + 1e-9
    with pytest.raises(ValueError, match="sum to"):
        predict_dense_rewards(r, sims, torch.tensor([0]))
