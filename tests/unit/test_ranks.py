"""Ranks of a launch in one process: the metric combination, the weights digest, what a process that
is not rank 0 does with MLflow (nothing), and the collectives on one process (plain calls). The real
launches are tests/e2e/test_launchers.py."""

from __future__ import annotations

import math
from contextlib import contextmanager

import pytest
import torch

from sdpo_core.rundir import ranks
from sdpo_core.training.distributed import combine_rank_metrics, weights_digest


def test_metrics_are_the_mean_over_ranks_and_times_the_slowest():
    # loss (1 + 2) / 2 = 1.5; time/epoch max(2, 3) = 3; a key only rank 1 has: its value alone
    got = combine_rank_metrics(
        [{"loss": 1.0, "time/epoch": 2.0}, {"loss": 2.0, "time/epoch": 3.0, "extra": 5.0}]
    )
    assert got == {"loss": 1.5, "time/epoch": 3.0, "extra": 5.0}
    assert list(got) == ["loss", "time/epoch", "extra"]  # rank 0's order first


def test_equal_values_on_every_rank_come_back_exactly():
    # 0.1 + 0.1 + 0.1 = 0.30000000000000004 in float, even summed exactly: sum / 3 is not 0.1
    assert math.fsum([0.1] * 3) / 3 != 0.1
    assert combine_rank_metrics([{"grad_norm": 0.1}] * 3) == {"grad_norm": 0.1}
    nan = combine_rank_metrics([{"x": math.nan}, {"x": 1.0}])["x"]
    assert math.isnan(nan)  # a NaN on one rank is not hidden by the others


def test_weights_digest_sees_one_bit_and_the_dtype_but_not_the_order():
    a = {"w": torch.tensor([1.0, 2.0]), "b": torch.zeros(3)}
    same = {"b": torch.zeros(3), "w": torch.tensor([1.0, 2.0])}
    assert weights_digest(a) == weights_digest(same)
    flipped = {"w": torch.tensor([1.0, 2.0]), "b": torch.zeros(3)}
    flipped["w"].view(torch.int32)[0] ^= 1  # the lowest mantissa bit of 1.0
    assert weights_digest(flipped) != weights_digest(a)
    assert weights_digest({**a, "w": a["w"].double()}) != weights_digest(a)


def test_collectives_are_plain_calls_on_one_process(tmp_path, monkeypatch):
    for var in (*ranks.RANK_VARS, *ranks.WORLD_SIZE_VARS, *ranks.LOCAL_RANK_VARS):
        monkeypatch.delenv(var, raising=False)
    assert ranks.is_main_process() and not ranks.launched()
    assert ranks.broadcast("x") == "x" and ranks.gather("x") == ["x"]
    assert ranks.main_only(lambda a, b: a + b, 1, 2) == 3
    with pytest.raises(KeyError):  # one process: the error itself, not ReportedByRankZero
        ranks.main_only(dict().__getitem__, "k")
    entered = []

    @contextmanager
    def cm():
        entered.append(1)
        yield 7

    with ranks.from_main_process(cm) as value:
        assert value == 7 and entered == [1]
    ranks.check_shared_run_dir(tmp_path / "run")
    assert not (tmp_path / "run").exists()  # nothing to check, nothing written


def test_a_rank_other_than_0_never_touches_mlflow(tmp_path, monkeypatch):
    """Rank 1 of a launch gets a NullTracker and skips the reachability check: it neither creates
    the store (two ranks racing to create MLflow's schema was the bug) nor calls the server."""
    from sdpo_core.tracking.trackers import NullTracker, make_tracker, preflight

    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    store = tmp_path / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}")
    assert isinstance(make_tracker("mlflow", "sdpo", run_name="x-train"), NullTracker)
    assert not store.exists()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # nothing listens on the discard port
    assert preflight("mlflow") == "mlflow"
