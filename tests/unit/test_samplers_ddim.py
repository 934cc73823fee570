"""DDIMSampler: the Sampler interface over ddim_step, against diffusers' DDIMScheduler."""

import pytest
import torch
from diffusers import DDIMScheduler, EulerAncestralDiscreteScheduler

from sdpo_core.samplers.ddim import DDIMParams, DDIMSampler, ddim_step
from sdpo_core.tiny.random_model import SD_TURBO_SCHEDULER


def _config(**over):
    return {**DDIMScheduler(**{**SD_TURBO_SCHEDULER, **over}).config, "_class_name": "DDIMScheduler"}


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_identical_to_ddim_step(prediction_type):
    # catches: a wrong timestep per step index, eta or last_step not passed through, noise handled differently
    cfg = _config(prediction_type=prediction_type)
    sampler = DDIMSampler(cfg, 4, eta=0.7, last_step="clamp")
    sched = DDIMScheduler.from_config(cfg)
    sched.set_timesteps(4)
    params = DDIMParams.from_scheduler(sched, 4, last_step="clamp")
    torch.manual_seed(0)
    x = torch.randn(3, 4, 4, 4)
    for i, t in enumerate(sched.timesteps):
        out, noise = torch.randn_like(x), torch.randn_like(x)
        got = sampler.step(out, torch.full((3,), i), x, noise=noise)
        want = ddim_step(params, out, t, x, 0.7, noise=noise)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        x = got.prev_sample


def test_mid_step_equals_diffusers_step_at_eta_1():
    # catches: DDIMSampler's schedule or step drifting from diffusers' own DDIMScheduler.step
    cfg = _config()
    sampler = DDIMSampler(cfg, 4, eta=1.0)
    sched = DDIMScheduler.from_config(cfg)
    sched.set_timesteps(4)
    torch.manual_seed(1)
    x, out, noise = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    ref = sched.step(out, sched.timesteps[2], x, eta=1.0, variance_noise=noise)
    got = sampler.step(out, 2, x, noise=noise)
    torch.testing.assert_close(got.prev_sample, ref.prev_sample, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.x0, ref.pred_original_sample, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(got.log_prob).all() and got.log_prob.shape == (2,)


def test_per_item_step_indices_equal_separate_steps():
    # catches: a batch whose items sit at different steps all stepped with the first item's timestep
    sampler = DDIMSampler(_config(), 4)
    torch.manual_seed(2)
    x, out, noise = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    idx = torch.tensor([0, 3, 1])
    both = sampler.step(out, idx, x, noise=noise)
    for j in range(3):
        one = sampler.step(out[j:j + 1], idx[j], x[j:j + 1], noise=noise[j:j + 1])
        torch.testing.assert_close(both.prev_sample[j:j + 1], one.prev_sample)
        torch.testing.assert_close(both.log_prob[j:j + 1], one.log_prob)


def test_timestep_spacing_option_and_rebuilt_from_euler_config():
    # catches: timestep_spacing ignored, or a non-DDIM config not rebuilt with its own schedule
    leading = DDIMSampler(_config(timestep_spacing="leading"), 4)
    trailing = DDIMSampler(_config(timestep_spacing="leading"), 4, timestep_spacing="trailing")
    assert leading.timesteps.tolist() == [751, 501, 251, 1]
    assert trailing.timesteps.tolist() == [999, 749, 499, 249]
    euler = EulerAncestralDiscreteScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, timestep_spacing="trailing",
        prediction_type="v_prediction",
    )
    sampler = DDIMSampler({**euler.config, "_class_name": "EulerAncestralDiscreteScheduler"}, 2)
    assert sampler.timesteps.tolist() == [999, 499]
    assert sampler.params.prediction_type == "v_prediction"
    torch.testing.assert_close(sampler.params.alphas_cumprod, euler.alphas_cumprod.float())


def test_final_alpha_last_step_raises_and_bad_options():
    # catches: a zero-variance last step silently returning an infinite log-prob; bad options accepted
    sampler = DDIMSampler(_config(set_alpha_to_one=True), 2, last_step="final_alpha")
    with pytest.raises(ValueError, match="zero variance"):
        sampler.step(torch.zeros(1, 4, 2, 2), 1, torch.zeros(1, 4, 2, 2))
    with pytest.raises(ValueError, match="eta"):
        DDIMSampler(_config(), 2, eta=0.0)
    with pytest.raises(ValueError, match="last_step"):
        DDIMSampler(_config(), 2, last_step="renoise")
    with pytest.raises(IndexError, match="out of range"):
        DDIMSampler(_config(), 2).step(torch.zeros(1, 4, 2, 2), 2, torch.zeros(1, 4, 2, 2))
