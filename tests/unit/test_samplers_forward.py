"""What a forward-process method (DiffusionNFT) and the per-step KL read from a sampler: ``add_noise``
against the diffusers schedulers' own forward process, ``transition`` against ``step``, and the two
facts methods/nft.py's derivation rests on (x0 is affine in the output; the exact target gives x0)."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler, LCMScheduler

from sdpo_core.samplers.common import gaussian_log_prob
from sdpo_core.samplers.ddim import DDIMSampler
from sdpo_core.samplers.flow_sde import FlowSDESampler
from sdpo_core.samplers.lcm import LCMSampler
from sdpo_core.tiny.random_model import SD_TURBO_SCHEDULER

SD3 = {"num_train_timesteps": 1000, "shift": 3.0}


def _ddim(prediction_type="epsilon"):
    cfg = {**DDIMScheduler(**{**SD_TURBO_SCHEDULER, "prediction_type": prediction_type}).config,
           "_class_name": "DDIMScheduler"}
    return DDIMSampler(cfg, 4, eta=1.0)


def _lcm():
    sched = LCMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_scaling=10.0)
    return LCMSampler({**sched.config, "_class_name": "LCMScheduler"}, 4)


SAMPLERS = {
    "ddim_eps": _ddim,
    "ddim_v": lambda: _ddim("v_prediction"),
    "lcm": _lcm,
    "flow_sde": lambda: FlowSDESampler(SD3, 4, noise_level=0.7),
    "flow_cps": lambda: FlowSDESampler(SD3, 4, noise_level=0.7, sde_type="cps"),
}


def _target(name, x0, eps, sampler, index):
    """The output that recovers x0 exactly: eps (epsilon), a eps - s x0 (v), eps - x0 (flow velocity)."""
    if name in ("ddim_eps", "lcm"):
        return eps
    if name == "ddim_v":
        a = sampler.params.alphas_cumprod[sampler.timesteps[index]].reshape(-1, 1, 1, 1)
        return a.sqrt() * eps - (1 - a).sqrt() * x0
    return eps - x0


@pytest.mark.parametrize("index", [0, 2, 3])
def test_add_noise_is_the_schedulers_forward_process(index):
    # catches: the wrong timestep for a step index (an off-by-one, the training grid instead of the
    # sampler's), sqrt forgotten, flow's (1 - s) x0 + s eps written the other way round
    torch.manual_seed(0)
    x0, eps = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    ddim = _ddim()
    want = DDIMScheduler.from_config(ddim.scheduler_config).add_noise(x0, eps, ddim.timesteps[[index, index]])
    torch.testing.assert_close(ddim.add_noise(x0, eps, torch.tensor([index, index])), want)
    lcm = _lcm()
    want = LCMScheduler.from_config(lcm.scheduler_config).add_noise(x0, eps, lcm.timesteps[[index, index]])
    torch.testing.assert_close(lcm.add_noise(x0, eps, torch.tensor(index)), want)
    flow = FlowSDESampler(SD3, 4)
    sched = FlowMatchEulerDiscreteScheduler.from_config(SD3)
    sched.set_timesteps(4)
    want = sched.scale_noise(x0, sched.timesteps[[index, index]], eps)
    torch.testing.assert_close(flow.add_noise(x0, eps, torch.tensor([index, index])), want)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_transition_is_what_step_draws_from_and_scores_under(name):
    # catches: step and transition drifting apart (one home per formula)
    sampler = SAMPLERS[name]()
    torch.manual_seed(1)
    x, out, z = torch.randn(3, 4, 3, 3), torch.randn(3, 4, 3, 3), torch.randn(3, 4, 3, 3)
    index = torch.tensor([0, 1, 2])
    mean, std, x0 = sampler.transition(out, index, x)
    got = sampler.step(out, index, x, noise=z)
    torch.testing.assert_close(got.prev_sample.float(), mean + std * z)
    torch.testing.assert_close(got.x0.float(), x0)
    torch.testing.assert_close(got.log_prob, gaussian_log_prob(got.prev_sample.float(), mean, std))


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_x0_is_affine_in_the_output_and_the_exact_target_gives_x0(name):
    # the derivation of methods/nft.py: mixing outputs with weights summing to 1 mixes their x0 the same
    # way (so the implicit policies are the same in eps, v or x0 space), and the output the forward
    # process implies (eps, v, eps - x0) predicts x0 back from add_noise's x_t; catches a forward process
    # on another schedule than the sampler's
    sampler = SAMPLERS[name]()
    torch.manual_seed(2)
    x0, eps = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    index = torch.tensor([0, 2])
    x_t = sampler.add_noise(x0, eps, index)
    f_old, f_new, beta = torch.randn_like(x0), torch.randn_like(x0), 0.3

    def x0_of(f):
        return sampler.transition(f, index, x_t).x0

    for w in (1 - beta, 1 + beta):  # the positive and the negative policy
        mixed = x0_of(w * f_old + (1 - w) * f_new)
        torch.testing.assert_close(mixed, w * x0_of(f_old) + (1 - w) * x0_of(f_new), atol=1e-4, rtol=1e-4)
    # LCM's x0 is the boundary-conditioned one: c_skip(t) x_t is ~4e-8 at its timesteps
    torch.testing.assert_close(x0_of(_target(name, x0, eps, sampler, index)), x0, atol=1e-4, rtol=1e-4)
