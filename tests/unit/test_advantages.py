"""Discounted returns by hand; the vectorised tracker against the per-prompt reference loop."""

import numpy as np
import pytest
import torch

from sdpo_core.rl.advantages import (
    PerStepPromptStatTracker,
    batch_normalise,
    discounted_returns,
    group_normalise,
    reference_per_prompt_advantages,
)


def test_discounted_returns_by_hand():
    # r = [1, 2, 3], gamma 0.5: R2 = 3, R1 = 2 + 0.5*3 = 3.5, R0 = 1 + 0.5*3.5 = 2.75
    out = discounted_returns(torch.tensor([[1.0, 2.0, 3.0]]), 0.5)
    torch.testing.assert_close(out, torch.tensor([[2.75, 3.5, 3.0]]))
    assert torch.equal(discounted_returns(torch.tensor([[1.0, 2.0]]), 0.0), torch.tensor([[1.0, 2.0]]))


def test_batch_normalise():
    out = batch_normalise(torch.tensor([[1.0], [3.0]]))  # mean 2, population std 1
    torch.testing.assert_close(out, torch.tensor([[-1.0], [1.0]]), atol=1e-5, rtol=0)


def test_group_normalise_by_hand():
    prompts = ["a", "b", "a", "b"]
    r = torch.tensor([[1.0], [10.0], [3.0], [14.0]])
    # group means: a 2, b 12 -> centred -1, -2, 1, 2
    # batch std of r (population): mean 7, deviations -6, 3, -4, 7 -> var (36+9+16+49)/4 = 27.5
    want_batch = torch.tensor([[-1.0], [-2.0], [1.0], [2.0]]) / 27.5 ** 0.5
    torch.testing.assert_close(group_normalise(prompts, r, "batch"), want_batch, atol=1e-5, rtol=0)
    # group stds: a 1, b 2 -> every advantage is -1 or +1
    torch.testing.assert_close(group_normalise(prompts, r, "group"), torch.tensor([[-1.0], [-1.0], [1.0], [1.0]]),
                               atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="3 values for 4 prompts"):
        group_normalise(prompts, r[:3])


def test_tracker_uses_batch_stats_before_min_count():
    tr = PerStepPromptStatTracker(buffer_size=4, min_count=3, num_steps=1)
    # two prompts, one value each: counts 1 < 3 -> batch statistics: mean 2, std 1
    adv = tr.update(["a", "b"], torch.tensor([[1.0], [3.0]]))
    torch.testing.assert_close(adv, torch.tensor([[-1.0], [1.0]]), atol=1e-5, rtol=0)


def test_tracker_uses_prompt_buffer_after_min_count():
    tr = PerStepPromptStatTracker(buffer_size=4, min_count=2, num_steps=1)
    tr.update(["a"], torch.tensor([[1.0]]))
    # 'a' now holds [1, 3]: mean 2, std 1 -> advantage of 3 is +1
    adv = tr.update(["a"], torch.tensor([[3.0]]))
    assert adv.item() == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("buffer_size,min_count", [(8, 4), (3, 2), (32, 16)])
def test_tracker_matches_reference_on_random_data(buffer_size, min_count):
    rng = np.random.default_rng(0)
    prompts_pool = [f"p{i}" for i in range(7)]
    tr = PerStepPromptStatTracker(buffer_size, min_count, num_steps=5)
    history: dict = {}
    for epoch in range(6):  # several epochs: frequent prompts reach min_count, 'rare' never does
        prompts = list(rng.choice(prompts_pool[:5], size=12)) + (["rare"] if epoch == 0 else [])
        returns = rng.normal(size=(len(prompts), 5))
        ours = tr.update(prompts, torch.tensor(returns)).numpy()
        ref = reference_per_prompt_advantages(prompts, returns, history, buffer_size, min_count)
        np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)
    counts = tr.count.tolist()
    assert max(counts) >= min_count and counts[tr.prompt_index["rare"]] < min_count


def test_tracker_many_repeats_in_one_batch_keeps_last_values():
    tr = PerStepPromptStatTracker(buffer_size=2, min_count=2, num_steps=1)
    # 4 values of 'a' in one batch: the buffer keeps the last two (3, 5): mean 4, std 1
    adv = tr.update(["a"] * 4, torch.tensor([[0.0], [100.0], [3.0], [5.0]]))
    torch.testing.assert_close(adv[-2:], torch.tensor([[-1.0], [1.0]]), atol=1e-5, rtol=0)


def test_tracker_state_roundtrip():
    tr = PerStepPromptStatTracker(4, 2, 3)
    tr.update(["a", "b", "a"], torch.randn(3, 3))
    other = PerStepPromptStatTracker(4, 2, 3)
    other.load_state_dict(tr.state_dict())
    x = torch.randn(2, 3)
    torch.testing.assert_close(tr.update(["a", "c"], x), other.update(["a", "c"], x))
    with pytest.raises(ValueError, match="buffer_size"):
        PerStepPromptStatTracker(8, 2, 3).load_state_dict(tr.state_dict())
