"""build_sampler: the sampler is read from the scheduler config's class."""

import pytest
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LCMScheduler,
    PNDMScheduler,
)

from sdpo_core.samplers import SCHEDULER_SAMPLERS, build_sampler
from sdpo_core.samplers.ddim import DDIMSampler
from sdpo_core.samplers.lcm import LCMSampler


def _cfg(cls, **kw):
    return {**cls(**kw).config, "_class_name": cls.__name__}


@pytest.mark.parametrize(
    "cls", [DDIMScheduler, EulerDiscreteScheduler, EulerAncestralDiscreteScheduler, PNDMScheduler,
            DPMSolverMultistepScheduler],
)
def test_ddpm_family_schedulers_get_ddim_rebuilt_from_their_config(cls):
    # catches: a DDPM-family scheduler unsupported, or its schedule (spacing, betas) not carried over
    cfg = _cfg(cls, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, timestep_spacing="trailing")
    sampler = build_sampler(cfg, 4, eta=0.5)
    assert isinstance(sampler, DDIMSampler) and sampler.eta == 0.5
    assert sampler.timesteps.tolist() == [999, 749, 499, 249]


def test_lcm_scheduler_gets_lcm_and_name_overrides():
    # catches: LCM models sampled with DDIM (wrong timesteps and no boundary condition)
    cfg = _cfg(LCMScheduler)
    assert isinstance(build_sampler(cfg, 2, last_step="deterministic"), LCMSampler)
    assert isinstance(build_sampler(cfg, 2, "ddim"), DDIMSampler)
    assert SCHEDULER_SAMPLERS["FlowMatchEulerDiscreteScheduler"] == "flow_sde"


def test_unsupported_or_unnamed_configs_raise_clearly():
    # catches: an unknown scheduler silently sampled as DDIM
    with pytest.raises(ValueError, match="KarrasVeScheduler.*supported: .*DDIMScheduler"):
        build_sampler({"_class_name": "KarrasVeScheduler"}, 2)
    with pytest.raises(ValueError, match="no '_class_name'"):
        build_sampler(dict(DDIMScheduler().config), 2)
    with pytest.raises(ValueError, match="'nope' is not available; registered: .*ddim"):
        build_sampler(_cfg(DDIMScheduler), 2, "nope")
