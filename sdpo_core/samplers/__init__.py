"""Stochastic samplers with log-probs (see ``sampler.py``): one file per sampler, the math they share in ``common.py``.

``build_sampler`` picks the sampler from the model's scheduler class (``_class_name`` of its
scheduler config) unless a name is given. A new sampler is one file plus one line in
``SAMPLERS`` (and, if a scheduler class should pick it, one in ``SCHEDULER_SAMPLERS``).
"""

from __future__ import annotations

from typing import Any

from sdpo_core.samplers.ddim import DDIMSampler
from sdpo_core.samplers.flow_sde import FlowSDESampler
from sdpo_core.samplers.lcm import LCMSampler
from sdpo_core.samplers.sampler import Sampler, StepOutput

#: sampler name -> class
SAMPLERS: dict[str, type[Sampler]] = {
    "ddim": DDIMSampler,
    "lcm": LCMSampler,
    "flow_sde": FlowSDESampler,
}

#: diffusers scheduler class -> the sampler that reproduces it (the DDPM-family schedulers are
#: rebuilt as DDIM from their config: same betas, prediction type and spacing)
SCHEDULER_SAMPLERS: dict[str, str] = {
    "DDIMScheduler": "ddim",
    "EulerDiscreteScheduler": "ddim",
    "EulerAncestralDiscreteScheduler": "ddim",
    "PNDMScheduler": "ddim",
    "DPMSolverMultistepScheduler": "ddim",
    "LCMScheduler": "lcm",
    "FlowMatchEulerDiscreteScheduler": "flow_sde",
}


def sampler_name_for(scheduler_config: dict[str, Any]) -> str:
    """The sampler name for a scheduler config, by its ``_class_name``."""
    if "_class_name" not in scheduler_config:
        raise ValueError(
            "the scheduler config has no '_class_name' (use Family.scheduler_config or scheduler_config.json), "
            "or name the sampler"
        )
    cls = scheduler_config["_class_name"]
    if cls not in SCHEDULER_SAMPLERS:
        raise ValueError(f"no sampler for scheduler class {cls!r}; supported: {sorted(SCHEDULER_SAMPLERS)}")
    return SCHEDULER_SAMPLERS[cls]


def build_sampler(scheduler_config: dict[str, Any], num_steps: int, name: str | None = None, **options: Any) -> Sampler:
    """The sampler ``name`` (or the one for the config's scheduler class) over ``num_steps`` steps.

    ``options`` are the sampler's own (ddim: eta, last_step, timestep_spacing; lcm: last_step).
    """
    name = name or sampler_name_for(scheduler_config)
    if name not in SAMPLERS:
        raise ValueError(f"sampler {name!r} is not available; registered: {sorted(SAMPLERS)}")
    return SAMPLERS[name](scheduler_config, num_steps, **options)


__all__ = ["SAMPLERS", "SCHEDULER_SAMPLERS", "Sampler", "StepOutput", "build_sampler", "sampler_name_for"]
