"""A flow run whose overrides name a `module:function` reward the operator did not allow fails at its
config, before any task runs (no model loads, no MLflow run opens, the function never runs), and
the overrides cannot widen the allow-list: it is not a config key."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from orchestration_testing import TINY

pytestmark = pytest.mark.services


def _task_runs(flow_run_id) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        return client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))


@pytest.mark.parametrize("widen", [[], ["reward.allowed_modules=os"]])
def test_os_system_reward_fails_the_flow_before_any_task(in_project: Path, widen):
    import mlflow

    from flows.sdpo_flow import sdpo

    marker = in_project / "pwned"
    overrides = [*TINY, "reward.name=os:system", f"reward.options.command=touch {marker}", *widen]
    state = sdpo("tiny-random", overrides, return_state=True)
    assert state.is_failed()
    expected = "unknown key 'reward.allowed_modules'" if widen else "module 'os' is not allowed to provide rewards"
    assert expected in state.message
    assert _task_runs(state.state_details.flow_run_id) == []  # prepare, base, train: none ran
    assert not marker.exists()
    # this test's store, named: an earlier test's tracker may have set mlflow's process-wide URI
    client = mlflow.MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("sdpo")
    assert experiment is None or not client.search_runs([experiment.experiment_id])
