"""The method strategies: which steps each scores, its returns, its loss, its update loop."""

import numpy as np
import pytest
import torch

from sdpo_core.config import TrainConfig, resolve_update_schedule
from sdpo_core.methods import METHODS, build_method


def _x0():
    # 2 trajectories x 3 steps of 2-dim "latents": trajectory 0's middle step is orthogonal to both ends
    x0 = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 0.1]],
                       [[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]]])
    return x0[:, :, :, None, None]  # (N, T, C, 1, 1)


def test_sdpo_scores_first_anchor_last_and_discounts_dense_rewards():
    m = build_method(TrainConfig(method="sdpo", gamma=0.5), num_steps=3)
    steps, extras = m.scored_steps(_x0())
    assert steps.tolist() == [[0, 1, 2], [0, 0, 2]]  # trajectory 1: all equal, the first minimum wins
    r = torch.tensor([[1.0, 2.0, 4.0], [1.0, 1.0, 1.0]])
    ret = m.returns(r, extras)
    # trajectory 0 is fully queried: dense (1, 2, 4); returns with gamma 0.5: (1 + 1 + 1, 2 + 2, 4)
    assert ret[0].tolist() == [3.0, 4.0, 4.0]
    assert m.tracked_steps == 3 and m.shared_noise and m.trajectories_per_item == 2


def test_sdpo_skip_unused_queries_scores_only_what_the_prediction_uses():
    # trajectory 0 (anchor 1): without the anchor it queries (first, last) only, and its returns are the
    # full query's with anchor=false; sparse: the last step only, and the returns of the full query
    x0, r_full = _x0(), torch.tensor([[1.0, 2.0, 4.0], [1.0, 1.0, 1.0]])
    for options, expected_steps, queries in (({"anchor": False}, [[0, 0, 2], [0, 0, 2]], 4),
                                             ({"dense_reward": False}, [[2, 2, 2], [2, 2, 2]], 2)):
        paper = build_method(TrainConfig(method="sdpo", gamma=0.5, **options), num_steps=3)
        lean = build_method(TrainConfig(method="sdpo", gamma=0.5, skip_unused_queries=True, **options), num_steps=3)
        full_steps, extras = paper.scored_steps(x0)
        assert full_steps.tolist() == [[0, 1, 2], [0, 0, 2]], "the default still scores first, anchor, last"
        steps, lean_extras = lean.scored_steps(x0)
        assert steps.tolist() == expected_steps
        assert len({(i, int(s)) for i, row in enumerate(steps) for s in row}) == queries  # distinct: scored once
        # the scorer gives each (trajectory, step) its reward: gather the full query's at the lean steps
        r_lean = torch.gather(torch.tensor([[1.0, 9.0, 4.0], [1.0, 9.0, 1.0]]), 1, steps)  # step 1 scores 9
        torch.testing.assert_close(lean.returns(r_lean, lean_extras), paper.returns(r_full, extras))


def test_ddpo_scores_the_last_step_only_and_returns_the_final_reward():
    m = build_method(TrainConfig(method="ddpo"), num_steps=3)
    steps, extras = m.scored_steps(_x0())
    assert steps.tolist() == [[2], [2]] and extras == {}
    assert m.returns(torch.tensor([[0.3], [0.7]]), extras).tolist() == [[pytest.approx(0.3)], [pytest.approx(0.7)]]
    assert m.tracked_steps == 1 and not m.shared_noise and m.trajectories_per_item == 1


def test_losses_dispatch_to_the_methods_own_objective():
    lp = torch.zeros(4)
    sdpo = build_method(TrainConfig(method="sdpo"), 2)
    # ratio 1 on both sides: d = 0, target A1 - A2 = 1 - (-1) = 2 -> squared error 4
    loss, _ = sdpo.loss([lp, lp], [lp, lp], [torch.ones(4), -torch.ones(4)], torch.ones(4))
    assert loss.item() == pytest.approx(4.0)
    ddpo = build_method(TrainConfig(method="ddpo"), 2)
    loss, _ = ddpo.loss([lp], [lp], [torch.ones(4)], torch.ones(4))
    assert loss.item() == pytest.approx(-1.0)  # -A * ratio


def test_auto_update_schedule_is_the_methods_own_loop():
    assert {n: resolve_update_schedule(TrainConfig(method=n)) for n in METHODS} == {
        "sdpo": "per_step", "ddpo": "per_trajectory", "grpo": "per_trajectory", "nft": "per_trajectory"}
    assert all(m.update_schedule in ("per_step", "per_trajectory") for m in METHODS.values())  # every method has its loop
    assert resolve_update_schedule(TrainConfig(method="sdpo", update_schedule="per_trajectory")) == "per_trajectory"


def test_grpo_draws_groups_of_g_trajectories_per_prompt():
    m = build_method(TrainConfig(method="grpo", grpo={"group_size": 4}), num_steps=3)
    prompts = [f"p{i}" for i in range(10)]
    batches = m.epoch_prompts(np.random.default_rng(0), prompts, num_batches=3, batch_size=4)
    assert [len(b) for b in batches] == [4, 4, 4]
    # each prompt of a batch gives two trajectories: 6 groups x 4 trajectories = 24 = 3 x 4 x 2
    trajectories = [p for b in batches for p in b * 2]
    counts = {p: trajectories.count(p) for p in trajectories}
    assert sorted(counts.values()) == [4] * 6  # six distinct prompts (drawn without replacement)
    assert not m.uses_stat_tracker and not m.shared_noise and m.tracked_steps == 1
    # one step of PPO-clip on its advantages, as DDPO
    lp = torch.zeros(2)
    loss, _ = m.loss([lp], [lp], [torch.tensor([1.0, -3.0])], torch.ones(2))
    assert loss.item() == pytest.approx(1.0)  # mean(-A * 1) = -(1 - 3) / 2


def test_sdpo_and_ddpo_draw_prompts_with_replacement_batch_by_batch():
    # the default draw is the one the trainer always made: rng.integers per batch
    m = build_method(TrainConfig(method="sdpo"), num_steps=2)
    got = m.epoch_prompts(np.random.default_rng(3), list("abcdef"), num_batches=2, batch_size=5)
    rng = np.random.default_rng(3)
    want = [[list("abcdef")[i] for i in rng.integers(0, 6, 5)] for _ in range(2)]
    assert got == want


def test_method_names_and_batch_checks_come_from_the_method_classes(monkeypatch):
    from pydantic import ValidationError

    from sdpo_core.config import TrainConfig as TC

    for name in METHODS:
        assert TC(method=name).method == name
    with pytest.raises(ValidationError, match="Input should be 'sdpo', 'ddpo', 'grpo' or 'nft'"):
        TC(method="triples")
    monkeypatch.setitem(METHODS, "triples", METHODS["ddpo"])  # one line in the registry makes it valid
    assert TC(method="triples").method == "triples"
    for cls in METHODS.values():  # what the trainer asks of every registered method
        assert cls.trajectories_per_item in (1, cls.trajectories_per_prompt)
        assert isinstance(cls.shared_noise, bool) and cls.update_schedule in ("per_step", "per_trajectory")
    assert METHODS["sdpo"].items_per_prompt() == 1 and METHODS["ddpo"].items_per_prompt() == 2

    class Sample:
        batch_size, num_batches_per_epoch = 3, 1

    with pytest.raises(ValueError, match="does not divide the 6 trajectories"):
        METHODS["ddpo"].check_batches(TrainConfig(method="ddpo", batch_size=4), Sample)
    METHODS["sdpo"].check_batches(TrainConfig(method="sdpo", batch_size=3), Sample)
    with pytest.raises(ValueError, match="group_size=4 does not divide the 6 trajectories"):
        METHODS["grpo"].check_batches(TrainConfig(method="grpo", batch_size=2, grpo={"group_size": 4}), Sample)
