"""Shared fixtures: no network, a tiny random diffusers pipeline built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# OpenMP threads that spin while waiting collapse throughput when servers and subprocesses share
# the 2 cores of a CI machine; set before torch is imported (here and in every subprocess)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# the tests' own `module:function` rewards, allowed as an operator allows theirs (here and in every
# subprocess and flow run); no_such_module_xyz: allowed but not installed, for the import error
TEST_REWARD_MODULES = ("reward_fixtures", "flow_rewards", "reward_fault_fns", "reward_server_fns",
                       "test_rewards_builtin", "no_such_module_xyz")
os.environ.setdefault("SDPO_ALLOWED_REWARD_MODULES", ",".join(TEST_REWARD_MODULES))

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def mlflow_per_test(tmp_path_factory, monkeypatch):
    """Every test (and every subprocess it starts) tracks into its own temporary MLflow store."""
    store = tmp_path_factory.mktemp("mlflow")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}/mlflow.db")
    return store


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    """A randomly initialised tiny StableDiffusionPipeline directory (from_pretrained-able)."""
    from sdpo_core.tiny.build import build_random_tiny

    return build_random_tiny(tmp_path_factory.mktemp("base") / "tiny", seed=0)


@pytest.fixture
def tiny_cfg(tiny_base):
    """Config factory for the tiny-random pipeline pointed at the session's tiny base."""
    from sdpo_core.config import load_config

    def make(*overrides: str):
        return load_config(
            "tiny-random",
            [f"model.pretrained={tiny_base}", "tracking.backend=none", *overrides],
            ROOT / "pipelines.yaml",
        )

    return make


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("gpu"):  # not `in item.keywords`: a folder named gpu/ matches that
            item.add_marker(skip)
