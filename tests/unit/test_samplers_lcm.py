"""LCMSampler against diffusers' LCMScheduler.step, and its log-prob by hand."""

import math

import pytest
import torch
from diffusers import LCMScheduler

from sdpo_core.samplers.lcm import LCMSampler


def _config(**over):
    sched = LCMScheduler(
        **{"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "set_alpha_to_one": True,
           "original_inference_steps": 50, "timestep_scaling": 10.0, **over}
    )
    return {**sched.config, "_class_name": "LCMScheduler"}


@pytest.mark.parametrize("num_steps", [1, 2, 4, 7])
@pytest.mark.parametrize("original", [50, 30])
def test_timesteps_are_lcm_schedulers(num_steps, original):
    # catches: timesteps taken from a DDIM-style spacing instead of LCM's original_inference_steps grid
    cfg = _config(original_inference_steps=original)
    sched = LCMScheduler.from_config(cfg)
    sched.set_timesteps(num_steps)
    assert LCMSampler(cfg, num_steps).timesteps.tolist() == sched.timesteps.tolist()


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("scaling", [10.0, 0.002])  # at 10, c_skip < 1e-5 for t >= 100: 0.002 makes it count
def test_non_final_steps_equal_diffusers_with_same_generator(prediction_type, scaling):
    # catches: wrong c_skip/c_out (timestep_scaling), wrong x0 for the prediction type, wrong next alpha,
    # or noise drawn differently from diffusers' randn_tensor(generator)
    cfg = _config(prediction_type=prediction_type, timestep_scaling=scaling)
    sched = LCMScheduler.from_config(cfg)
    sched.set_timesteps(4)
    sampler = LCMSampler(cfg, 4, last_step="deterministic")
    torch.manual_seed(0)
    x_ref = x = torch.randn(2, 4, 4, 4)
    g_ref, g = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    for i, t in enumerate(sched.timesteps):
        out = torch.randn_like(x)
        ref = sched.step(out, t, x_ref, generator=g_ref)
        got = sampler.step(out, torch.full((2,), i), x, generator=g)
        torch.testing.assert_close(got.x0, ref.denoised, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got.prev_sample, ref.prev_sample, rtol=1e-5, atol=1e-5)
        final = i == 3
        assert torch.isnan(got.log_prob).all() == final and (final or torch.isfinite(got.log_prob).all())
        x_ref, x = ref.prev_sample, got.prev_sample


def test_deterministic_last_step_is_diffusers_and_cannot_be_scored():
    # catches: noise added on the deterministic last step, or a training step scored on it silently
    cfg = _config()
    sched = LCMScheduler.from_config(cfg)
    sched.set_timesteps(1)
    x, out = torch.randn(2, 4, 2, 2), torch.randn(2, 4, 2, 2)
    ref = sched.step(out, sched.timesteps[0], x)
    got = LCMSampler(cfg, 1, last_step="deterministic").step(out, 0, x)
    torch.testing.assert_close(got.prev_sample, ref.denoised, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="deterministic last LCM step"):
        LCMSampler(cfg, 1, last_step="deterministic").step(out, 0, x, prev_sample=got.prev_sample)


def test_renoise_last_step_goes_to_alphas_cumprod_0_with_finite_log_prob():
    # catches: the default last step left deterministic (a 1-step LCM untrainable), or re-noised elsewhere
    cfg = _config()
    sched = LCMScheduler.from_config(cfg)
    sched.set_timesteps(2)
    a0 = float(sched.alphas_cumprod[0])
    x, out, noise = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    sampler = LCMSampler(cfg, 2)
    got = sampler.step(out, 1, x, noise=noise)
    torch.testing.assert_close(got.prev_sample, math.sqrt(a0) * got.x0 + math.sqrt(1 - a0) * noise)
    det = LCMSampler(cfg, 2, last_step="deterministic").step(out, 1, x)
    torch.testing.assert_close(got.x0, det.x0)  # same denoised; only the draw differs
    assert torch.isfinite(got.log_prob).all()
    rescored = sampler.step(out, 1, x, prev_sample=got.prev_sample)
    torch.testing.assert_close(rescored.log_prob, got.log_prob)


def test_log_prob_by_hand():
    # 1 step of T=2 (t=999 -> s=499), x0-prediction, one item of C*h*w = 2 values
    # catches: a wrong std (e.g. DDIM's sigma), a sum instead of a mean, or a mean without sqrt(a_s)
    cfg = _config(prediction_type="sample")
    sampler = LCMSampler(cfg, 2)
    t, s = sampler.timesteps.tolist()
    ac = LCMScheduler.from_config(cfg).alphas_cumprod.double()
    st = t * 10.0
    c_skip, c_out = 0.25 / (st**2 + 0.25), st / math.sqrt(st**2 + 0.25)
    x = torch.tensor([[[[0.5, -1.0]]]])
    out = torch.tensor([[[[0.2, 0.4]]]])
    prev = torch.tensor([[[[0.1, 0.3]]]])
    got = sampler.step(out, 0, x, prev_sample=prev)
    a_s = float(ac[s])
    want = 0.0
    for xi, oi, pi in [(0.5, 0.2, 0.1), (-1.0, 0.4, 0.3)]:
        mean = math.sqrt(a_s) * (c_out * oi + c_skip * xi)
        var = 1 - a_s
        want += -((pi - mean) ** 2) / (2 * var) - 0.5 * math.log(2 * math.pi * var)
    assert got.log_prob.item() == pytest.approx(want / 2, rel=1e-5)


def test_per_item_steps_and_bad_options():
    # catches: mixed step indices using one item's constants; bad configs accepted
    cfg = _config()
    sampler = LCMSampler(cfg, 4)
    x, out, noise = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    idx = torch.tensor([3, 0, 2])
    both = sampler.step(out, idx, x, noise=noise)
    for j in range(3):
        one = sampler.step(out[j:j + 1], idx[j], x[j:j + 1], noise=noise[j:j + 1])
        torch.testing.assert_close(both.prev_sample[j:j + 1], one.prev_sample)
        torch.testing.assert_close(both.log_prob[j:j + 1], one.log_prob)
    with pytest.raises(ValueError, match="last_step"):
        LCMSampler(cfg, 2, last_step="clamp")
    with pytest.raises(ValueError, match="thresholding"):
        LCMSampler(_config(thresholding=True), 2)
