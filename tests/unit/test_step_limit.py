"""config.step_limit (the config-time check of sample.num_steps / evaluate.steps, read from a local
model's scheduler_config.json) agrees with the samplers themselves: they build at the limit and
refuse one step more."""

from __future__ import annotations

import pytest

from sdpo_core.config import ConfigError, step_limit
from sdpo_core.samplers import build_sampler

CONFIGS = [
    ({"_class_name": "DDIMScheduler"}, None, 1000),
    ({"_class_name": "DDIMScheduler", "num_train_timesteps": 100}, None, 100),
    ({"_class_name": "EulerDiscreteScheduler", "num_train_timesteps": 500}, None, 500),
    ({"_class_name": "LCMScheduler"}, None, 50),
    ({"_class_name": "LCMScheduler", "original_inference_steps": 80}, None, 80),
    ({"_class_name": "LCMScheduler", "num_train_timesteps": 30, "original_inference_steps": 30}, None, 30),
    ({"_class_name": "DDIMScheduler", "original_inference_steps": 20}, "lcm", 20),  # sample.sampler: lcm
]


@pytest.mark.parametrize(("scheduler", "sampler", "limit"), CONFIGS)
def test_limit_is_where_the_sampler_stops(scheduler, sampler, limit):
    assert step_limit(scheduler, sampler)[0] == limit
    build_sampler(scheduler, limit, sampler)
    with pytest.raises(ValueError):
        build_sampler(scheduler, limit + 1, sampler)


def test_flow_sampler_has_no_step_limit():
    scheduler = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}
    assert step_limit(scheduler, None)[0] == float("inf")
    assert build_sampler(scheduler, 1500).num_steps == 1500


def test_evaluate_steps_over_the_local_scheduler_fail_at_load(tiny_cfg):
    with pytest.raises(ConfigError, match=r"'evaluate.steps': \[1001, 5000\] exceeds 1000.*scheduler_config.json"):
        tiny_cfg("evaluate.steps=[1, 1001, 5000]")
    assert tiny_cfg("evaluate.steps=[1, 1000]").evaluate.steps == [1, 1000]
