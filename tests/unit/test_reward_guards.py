"""``check_rewards``: every bad value a reward can return is a RewardError naming the reward."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sdpo_core.rewards import RewardError, check_rewards


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (torch.tensor([1.0, float("nan"), 2.0]), r"non-finite values at items \[1\]: \[nan\]"),
        (torch.tensor([float("inf"), 0.0, 0.0]), r"non-finite values at items \[0\]: \[inf\]"),
        (torch.tensor([0.0, 0.0, float("-inf")]), r"non-finite values at items \[2\]: \[-inf\]"),
        (torch.zeros(3, 1), r"shape \(3, 1\), expected \(3,\)"),
        (torch.zeros(2), r"shape \(2,\), expected \(3,\)"),
        (torch.zeros(()), r"shape \(\), expected \(3,\)"),
        (torch.tensor([1, 2, 3]), r"dtype torch.int64, expected a floating dtype"),
        (torch.tensor([True, False, True]), r"dtype torch.bool, expected a floating dtype"),
        ([1.0, 2.0, 3.0], r"returned list, expected a torch.Tensor of shape \(3,\)"),
        (np.zeros(3, dtype=np.float32), r"returned ndarray, expected a torch.Tensor"),
        (None, r"returned NoneType"),
    ],
)
def test_bad_values_raise_naming_the_reward(values, message):
    with pytest.raises(RewardError, match=r"reward 'my_reward'") as err:
        check_rewards("my_reward", values, 3)
    assert err.match(message)


def test_good_values_come_back_as_float32():
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        out = check_rewards("r", torch.tensor([0.5, -1.0, 2.0], dtype=dtype), 3)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, torch.tensor([0.5, -1.0, 2.0]))


def test_many_bad_items_are_listed_briefly():
    values = torch.full((20,), float("nan"))
    with pytest.raises(RewardError) as err:
        check_rewards("r", values, 20)
    assert "[0, 1, 2, 3, 4, 5, 6, 7]" in str(err.value) and "19" not in str(err.value)
