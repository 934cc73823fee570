"""The log-prob DDIM step against diffusers' own DDIMScheduler.step, and by hand."""

import math

import pytest
import torch
from diffusers import DDIMScheduler

from sdpo_core.samplers.ddim import DDIMParams, ddim_step


def _scheduler(prediction_type: str, spacing: str, set_alpha_to_one: bool = False) -> DDIMScheduler:
    return DDIMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
        set_alpha_to_one=set_alpha_to_one, steps_offset=1, prediction_type=prediction_type,
        timestep_spacing=spacing,
    )


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("eta", [0.3, 1.0])
@pytest.mark.parametrize("num_steps", [1, 4, 7])
def test_matches_diffusers_step(prediction_type, spacing, eta, num_steps):
    torch.manual_seed(0)
    sched = _scheduler(prediction_type, spacing)
    sched.set_timesteps(num_steps)
    params = DDIMParams.from_scheduler(sched, num_steps, last_step="final_alpha")
    x = torch.randn(3, 4, 8, 8)
    for t in sched.timesteps:
        out = torch.randn_like(x)
        noise = torch.randn_like(x)
        ref = sched.step(out, t, x, eta=eta, variance_noise=noise)
        prev, x0, _ = ddim_step(params, out, t, x, eta, noise=noise)
        torch.testing.assert_close(prev, ref.prev_sample, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(x0, ref.pred_original_sample, rtol=1e-5, atol=1e-5)
        x = prev


def test_clamp_last_step_equals_diffusers_without_alpha_one():
    # set_alpha_to_one=False makes diffusers' final alpha alphas_cumprod[0]: the paper's clamp
    sched = _scheduler("epsilon", "trailing", set_alpha_to_one=False)
    sched.set_timesteps(1)
    params = DDIMParams.from_scheduler(sched, 1, last_step="clamp")
    x, out, noise = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    ref = sched.step(out, sched.timesteps[0], x, eta=1.0, variance_noise=noise)
    prev, _, lp = ddim_step(params, out, sched.timesteps[0], x, 1.0, noise=noise)
    torch.testing.assert_close(prev, ref.prev_sample, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(lp).all()


def test_final_alpha_one_has_no_log_prob():
    sched = _scheduler("epsilon", "trailing", set_alpha_to_one=True)
    sched.set_timesteps(1)
    params = DDIMParams.from_scheduler(sched, 1, last_step="final_alpha")
    with pytest.raises(ValueError, match="zero variance"):
        ddim_step(params, torch.zeros(1, 4, 2, 2), sched.timesteps[0], torch.zeros(1, 4, 2, 2), 1.0)


def test_scoring_given_prev_sample_returns_same_log_prob():
    sched = _scheduler("epsilon", "trailing")
    sched.set_timesteps(4)
    params = DDIMParams.from_scheduler(sched, 4)
    x, out = torch.randn(5, 4, 8, 8), torch.randn(5, 4, 8, 8)
    g = torch.Generator().manual_seed(1)
    prev, _, lp = ddim_step(params, out, sched.timesteps[1], x, 1.0, generator=g)
    _, _, lp2 = ddim_step(params, out, sched.timesteps[1], x, 1.0, prev_sample=prev)
    assert torch.equal(lp, lp2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_sample_is_scored_exactly_as_returned(dtype):
    # a half-precision model's x_t: the returned x_{t-1} stays float32, so re-scoring the stored
    # tensor gives the log-prob of the draw bit for bit (rounding it to the model dtype would not)
    sched = _scheduler("epsilon", "trailing")
    sched.set_timesteps(4)
    params = DDIMParams.from_scheduler(sched, 4)
    x, out = torch.randn(5, 4, 16, 16).to(dtype), torch.randn(5, 4, 16, 16).to(dtype)
    t = sched.timesteps[3]  # the last step: the smallest sigma, where rounding moves the log-prob most
    prev, x0, lp = ddim_step(params, out, t, x, 1.0, generator=torch.Generator().manual_seed(3))
    assert prev.dtype == torch.float32 and x0.dtype == torch.float32
    _, _, lp_again = ddim_step(params, out, t, x, 1.0, prev_sample=prev)
    assert torch.equal(lp, lp_again)
    _, _, lp_rounded = ddim_step(params, out, t, x, 1.0, prev_sample=prev.to(dtype))
    assert (lp_rounded - lp).abs().max() > 1e-4  # what storing the rounded tensor used to cost


def test_log_prob_by_hand():
    # alphas_cumprod = [0.9, 0.5]; 2 train steps, 1 inference step at t=1 -> prev t=0 (clamp).
    # a_t = 0.5, a_prev = 0.9; variance = (1-0.9)/(1-0.5) * (1 - 0.5/0.9) = 0.2 * 4/9 = 0.08889
    # eta = 1: std = sqrt(0.08889) = 0.29814. Epsilon prediction with eps = 0 and x = 1:
    # x0 = (1 - sqrt(0.5)*0)/sqrt(0.5) = 1.41421; direction = sqrt(1 - 0.9 - 0.08889) * 0 = 0
    # mean = sqrt(0.9) * 1.41421 = 1.34164. For prev = mean + std (one std away) each element's
    # log-density is -1/2 - log(std) - log(2 pi)/2 = -0.5 + 1.21018 - 0.91894 = -0.20876.
    params = DDIMParams(torch.tensor([0.9, 0.5]), 1.0, 2, 1, "epsilon")
    x = torch.ones(1, 1, 2, 2)
    std = math.sqrt(0.1 / 0.5 * (1 - 0.5 / 0.9))
    mean = math.sqrt(0.9) * (1 / math.sqrt(0.5))
    prev, x0, lp = ddim_step(params, torch.zeros_like(x), torch.tensor(1), x, 1.0,
                             prev_sample=torch.full_like(x, mean + std))
    assert x0.flatten()[0].item() == pytest.approx(1.41421, abs=1e-5)
    assert lp.item() == pytest.approx(-0.5 - math.log(std) - 0.5 * math.log(2 * math.pi), abs=1e-5)
    assert lp.item() == pytest.approx(-0.20876, abs=1e-4)


def test_per_item_timesteps_equal_separate_calls():
    sched = _scheduler("epsilon", "trailing")
    sched.set_timesteps(4)
    params = DDIMParams.from_scheduler(sched, 4)
    x, out, prev = torch.randn(4, 4, 4, 4), torch.randn(4, 4, 4, 4), torch.randn(4, 4, 4, 4)
    ts = sched.timesteps[torch.tensor([0, 3, 1, 2])]
    _, _, lp = ddim_step(params, out, ts, x, 1.0, prev_sample=prev)
    for i in range(4):
        _, _, lpi = ddim_step(params, out[i : i + 1], ts[i], x[i : i + 1], 1.0, prev_sample=prev[i : i + 1])
        torch.testing.assert_close(lp[i : i + 1], lpi)


def test_eta_zero_rejected():
    params = DDIMParams(torch.tensor([0.9, 0.5]), 1.0, 2, 1, "epsilon")
    with pytest.raises(ValueError, match="eta"):
        ddim_step(params, torch.zeros(1, 1, 1, 1), torch.tensor(1), torch.zeros(1, 1, 1, 1), 0.0)
