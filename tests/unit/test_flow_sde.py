"""FlowSDESampler (samplers/flow_sde.py) against FlowMatchEulerDiscreteScheduler and by hand."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import calculate_shift as diffusers_shift

from sdpo_core.samplers.flow_sde import FlowSDESampler, calculate_shift, flow_sigmas

SD3_CONFIG = {"num_train_timesteps": 1000, "shift": 3.0}
FLUX_CONFIG = {
    "num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": True, "base_shift": 0.5,
    "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096,
}


def _scheduler(config, num_steps, mu=None, uniform=False):
    sched = FlowMatchEulerDiscreteScheduler.from_config(config)
    kwargs = {"mu": mu} if mu is not None else {}
    if uniform:
        sched.set_timesteps(sigmas=[1 - i / num_steps for i in range(num_steps)], **kwargs)
    else:
        sched.set_timesteps(num_steps, **kwargs)
    return sched


@pytest.mark.parametrize("sde_type", ["sde", "cps"])
@pytest.mark.parametrize("config,uniform,mu", [(SD3_CONFIG, False, None), (FLUX_CONFIG, True, 0.8)])
@pytest.mark.parametrize("num_steps", [1, 2, 4])
def test_noise_level_zero_is_the_scheduler_step(sde_type, config, uniform, mu, num_steps):
    # catches: a wrong drift coefficient, dt of the wrong sign, an off-by-one sigma index, the
    # wrong shift / schedule (timesteps would differ from the scheduler's)
    sampler = FlowSDESampler(config, num_steps, noise_level=0.0, sde_type=sde_type, mu=mu,
                             sigma_schedule="uniform" if uniform else "scheduler")
    sched = _scheduler(config, num_steps, mu=mu, uniform=uniform)
    torch.testing.assert_close(sampler.timesteps, sched.timesteps)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 4, 4, generator=gen)
    for i, t in enumerate(sched.timesteps):
        v = torch.randn(x.shape, generator=gen)
        expected = sched.step(v, t, x).prev_sample
        out = sampler.step(v, torch.full((3,), i), x, generator=gen)
        torch.testing.assert_close(out.prev_sample, expected, rtol=1e-5, atol=1e-5)
        # x0 = x_t - sigma * v (rectified flow: x_t = (1 - s) x0 + s noise, v = noise - x0)
        torch.testing.assert_close(out.x0, x - sched.sigmas[i] * v)
        x = expected


def test_flux_mu_and_schedule_match_the_pipeline():
    # FluxPipeline: sigmas linspace(1, 1/T, T), mu from the image token count
    mu = calculate_shift(64, 256, 4096, 0.5, 1.15)
    assert mu == pytest.approx(0.5 + (1.15 - 0.5) / (4096 - 256) * (64 - 256))
    sig = flow_sigmas(FLUX_CONFIG, 4, mu=mu, schedule="uniform")
    base = torch.tensor([1.0, 0.75, 0.5, 0.25])
    expected = math.exp(mu) / (math.exp(mu) + (1 / base - 1))
    torch.testing.assert_close(sig[:-1], expected.float())
    assert sig[-1] == 0
    with pytest.raises(ValueError, match="mu"):
        FlowSDESampler(FLUX_CONFIG, 4)


def test_image_seq_len_gives_the_pipelines_mu():
    # the family reports the image token count, the sampler computes mu as FluxPipeline does
    c = FLUX_CONFIG
    mu = diffusers_shift(64, c["base_image_seq_len"], c["max_image_seq_len"], c["base_shift"], c["max_shift"])
    by_len = FlowSDESampler(FLUX_CONFIG, 4, sigma_schedule="uniform", image_seq_len=64)
    # catches: a shift computed from the wrong config fields or token count, or not applied at all
    assert torch.equal(by_len.sigmas, FlowSDESampler(FLUX_CONFIG, 4, sigma_schedule="uniform", mu=mu).sigmas)
    assert not torch.equal(by_len.sigmas, FlowSDESampler(FLUX_CONFIG, 4, sigma_schedule="uniform", mu=0.0).sigmas)
    # an explicit mu (sample.sampler_options) wins over the family's token count
    explicit = FlowSDESampler(FLUX_CONFIG, 4, sigma_schedule="uniform", image_seq_len=64, mu=0.3)
    assert torch.equal(explicit.sigmas, FlowSDESampler(FLUX_CONFIG, 4, sigma_schedule="uniform", mu=0.3).sigmas)


def test_sde_step_by_hand():
    # one latent value, 3 steps of an unshifted schedule: sigmas [1, 0.5005, 0.001, 0]
    # (set_timesteps(3) spans 1 .. 1/1000); step 1 (s = 0.5005 -> s' = 0.001) by hand
    sampler = FlowSDESampler({"num_train_timesteps": 1000, "shift": 1.0}, 3, noise_level=0.5)
    s, s_next = float(sampler.sigmas[1]), float(sampler.sigmas[2])
    assert (s, s_next) == (pytest.approx(0.5005, abs=1e-4), pytest.approx(0.001, abs=1e-6))
    x, v, z = torch.tensor(0.3), torch.tensor(-0.2), torch.tensor(0.7)
    dt = s_next - s
    std_t = 0.5 * math.sqrt(s / (1 - s))
    mean = x * (1 + std_t**2 / (2 * s) * dt) + v * (1 + std_t**2 * (1 - s) / (2 * s)) * dt
    std = std_t * math.sqrt(-dt)
    prev = mean + std * z
    lp = -((prev - mean) ** 2) / (2 * std**2) - math.log(std) - 0.5 * math.log(2 * math.pi)
    out = sampler.step(v.reshape(1, 1, 1, 1), torch.tensor([1]), x.reshape(1, 1, 1, 1), noise=z.reshape(1, 1, 1, 1))
    assert out.prev_sample.item() == pytest.approx(float(prev), rel=1e-5)
    assert out.log_prob.item() == pytest.approx(float(lp), rel=1e-5)
    # scoring a given prev_sample: the log-prob averages over C*h*w
    # (mean: -log std - log sqrt(2 pi); one std off: that - 1/2; their average: - 1/4)
    prevs = torch.stack([mean, mean + std]).reshape(1, 2, 1, 1)
    scored = sampler.step(v.expand(1, 2, 1, 1), torch.tensor([1]), x.expand(1, 2, 1, 1), prev_sample=prevs)
    lp_mean = -math.log(std) - 0.5 * math.log(2 * math.pi)
    assert scored.log_prob.item() == pytest.approx(lp_mean - 0.25, rel=1e-5)


def test_sde_first_step_uses_sigma_max_and_last_step_is_stochastic():
    sampler = FlowSDESampler(SD3_CONFIG, 4, noise_level=0.7)
    assert sampler.sigmas[0] == 1 and sampler.sigma_max == pytest.approx(float(sampler.sigmas[1]))
    gen = torch.Generator().manual_seed(1)
    x, v = torch.randn(2, 4, 4, 4, generator=gen), torch.randn(2, 4, 4, 4, generator=gen)
    first = sampler.step(v, torch.tensor([0, 0]), x, generator=gen)
    last = sampler.step(v, torch.tensor([3, 3]), x, generator=gen)
    for out in (first, last):
        # catches: sigma = 1 dividing by zero (inf std, -inf log-prob), a deterministic last step
        assert torch.isfinite(out.log_prob).all() and torch.isfinite(out.prev_sample).all()
        assert out.log_prob.dtype == torch.float32
    # the last step still adds noise: it is not the Euler step
    s = float(sampler.sigmas[3])
    assert (last.prev_sample - (x - s * v)).abs().max() > 1e-2
    # std at the first step: a * sqrt(1 / (1 - sigmas[1])) * sqrt(1 - sigmas[1]) = a
    mean_only = sampler.step(v, torch.tensor([0, 0]), x, noise=torch.zeros_like(x))
    resid = (first.prev_sample - mean_only.prev_sample)
    assert resid.std().item() == pytest.approx(0.7, rel=0.15)


def test_cps_keeps_coefficients_and_its_last_step_is_deterministic():
    sampler = FlowSDESampler(SD3_CONFIG, 4, noise_level=0.8, sde_type="cps")
    gen = torch.Generator().manual_seed(2)
    x0, noise = torch.randn(1, 4, 8, 8, generator=gen), torch.randn(1, 4, 8, 8, generator=gen)
    s, s_next = sampler.sigmas[1], sampler.sigmas[2]
    x = (1 - s) * x0 + s * noise
    v = noise - x0  # a perfect denoiser
    z = torch.randn(x.shape, generator=gen)
    out = sampler.step(v, torch.tensor([1]), x, noise=z)
    std = s_next * math.sin(0.8 * math.pi / 2)
    # x' = (1 - s') x0 + sqrt(s'^2 - std^2) noise + std z: the x0 coefficient is exactly 1 - s'
    expected = (1 - s_next) * x0 + torch.sqrt(s_next**2 - std**2) * noise + std * z
    torch.testing.assert_close(out.prev_sample, expected, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(out.log_prob).all()
    last = sampler.step(v, torch.tensor([3]), x, noise=z)
    torch.testing.assert_close(last.prev_sample, last.x0)  # s' = 0: x' = x0, no noise
    assert last.log_prob.item() == 0.0  # a point mass (documented)


def test_per_item_steps_and_bad_input():
    sampler = FlowSDESampler(SD3_CONFIG, 3)
    x, v = torch.randn(2, 4, 2, 2), torch.randn(2, 4, 2, 2)
    z = torch.randn(2, 4, 2, 2)
    both = sampler.step(v, torch.tensor([0, 2]), x, noise=z)
    a = sampler.step(v[:1], torch.tensor([0]), x[:1], noise=z[:1])
    b = sampler.step(v[1:], torch.tensor([2]), x[1:], noise=z[1:])
    # catches: one item's sigma applied to the whole batch
    torch.testing.assert_close(both.prev_sample, torch.cat([a.prev_sample, b.prev_sample]))
    torch.testing.assert_close(both.log_prob, torch.cat([a.log_prob, b.log_prob]))
    with pytest.raises(IndexError, match="step_index"):
        sampler.step(v, torch.tensor([0, 3]), x)
    with pytest.raises(ValueError, match="sde_type"):
        FlowSDESampler(SD3_CONFIG, 3, sde_type="ode")
    with pytest.raises(ValueError, match="noise_level"):
        FlowSDESampler(SD3_CONFIG, 3, noise_level=-0.1)


def test_gradients_flow_through_the_mean():
    sampler = FlowSDESampler(SD3_CONFIG, 2)
    x = torch.randn(1, 4, 2, 2)
    v = torch.randn(1, 4, 2, 2, requires_grad=True)
    prev = sampler.step(v.detach(), torch.tensor([0]), x, noise=torch.randn_like(x)).prev_sample
    lp = sampler.step(v, torch.tensor([0]), x, prev_sample=prev).log_prob
    lp.sum().backward()
    assert v.grad is not None and v.grad.abs().sum() > 0
