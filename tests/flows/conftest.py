"""The `sdpo` flow in-process against Prefect's test harness (a real API on a temporary SQLite
database), in a throwaway git checkout with its own MLflow database and DVC remote."""

from __future__ import annotations

import os

import pytest
from orchestration_testing import OFFLINE_ENV, make_project

import flows  # noqa: F401  (sets PREFECT_LOGGING_EXTRA_LOGGERS before prefect is imported)


@pytest.fixture(scope="session")
def prefect_api():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60):
        yield


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """One checkout per test module: its runs share a registry (champion, then challenger)."""
    return make_project(tmp_path_factory.mktemp("project"))


@pytest.fixture
def in_project(project, prefect_api, monkeypatch):
    monkeypatch.chdir(project)
    for key, value in OFFLINE_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{project / 'mlflow.db'}")
    monkeypatch.setenv("DVC_SITE_CACHE_DIR", str(project / ".dvc" / "tmp" / "site-cache"))
    # the operator's allow-list of reward modules (tests/conftest.py) stays: the flows name flow_rewards
    for key in [k for k in os.environ if k.startswith("SDPO_") and k != "SDPO_ALLOWED_REWARD_MODULES"]:
        monkeypatch.delenv(key)
    return project
