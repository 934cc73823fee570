"""SD3Family and FluxFamily on tiny pipelines built in code (sdpo_core/tiny/flow.py), against the
diffusers pipelines' own calls."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from sdpo_core.families.flux import FluxFamily, pack_latents, unpack_latents
from sdpo_core.families.sd3 import SD3Family
from sdpo_core.samplers.flow_sde import FlowSDESampler
from sdpo_core.tiny.flow import build_tiny_flux, build_tiny_sd3

PROMPTS = ["a photo of a cat", "a red dog", "digit two"]
MAX_LEN = 16


def _load(kind: str, path) -> SD3Family | FluxFamily:
    if kind == "sd3":
        return SD3Family.load(str(path), None, "cpu", torch.float32, use_t5=False, max_sequence_length=MAX_LEN)
    return FluxFamily.load(str(path), None, "cpu", torch.float32, max_sequence_length=MAX_LEN)


@pytest.fixture(scope="module", params=["sd3", "flux"])
def tiny_flow(request, tmp_path_factory):
    """(kind, saved pipeline dir). FLUX with dynamic shifting on, so ``mu`` matters."""
    path = tmp_path_factory.mktemp(request.param) / "pipe"
    pipe = build_tiny_sd3(seed=0) if request.param == "sd3" else build_tiny_flux(seed=0, dynamic_shifting=True)
    pipe.save_pretrained(path)
    return request.param, path


def _pipe_kwargs(kind: str) -> dict:
    extra = {"guidance_scale": 1.0} if kind == "sd3" else {"guidance_scale": 0.0}
    return dict(num_inference_steps=3, height=32, width=32, max_sequence_length=MAX_LEN, **extra)


def _pipe_latents(kind: str, latents: torch.Tensor) -> torch.Tensor:
    """Our (N, C, h, w) latents in the layout the pipeline's ``latents=`` takes (FLUX: packed)."""
    return latents if kind == "sd3" else pack_latents(latents)


def test_encode_keys_rows_and_latent_shape(tiny_flow):
    kind, path = tiny_flow
    fam = _load(kind, path)
    cond = fam.encode(PROMPTS)
    assert set(cond.tensors) == {"encoder_hidden_states", "pooled_projections"}
    assert len(cond) == 3
    hidden, pooled = cond.tensors["encoder_hidden_states"], cond.tensors["pooled_projections"]
    # SD3: 32 CLIP tokens + 16 (zero) T5 tokens, width 64; FLUX: 16 T5 tokens of width 32
    assert hidden.shape == ((3, 32 + MAX_LEN, 64) if kind == "sd3" else (3, MAX_LEN, 32))
    assert pooled.shape == ((3, 64) if kind == "sd3" else (3, 32))
    # rows are the prompts' own (catches a broadcast of the first prompt)
    assert not torch.allclose(pooled[0], pooled[1])
    torch.testing.assert_close(fam.encode(PROMPTS[1:2]).tensors["pooled_projections"], pooled[1:2])
    assert fam.latent_shape(32) == (16, 8, 8)


def test_pack_unpack_roundtrip_and_layout():
    x = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).reshape(2, 3, 4, 6)
    tokens = pack_latents(x)
    assert tokens.shape == (2, 2 * 3, 12)
    # token 0 holds channel 0's top-left 2x2 patch first (c * 4 + 2 * dy + dx)
    torch.testing.assert_close(tokens[0, 0, :4], torch.tensor([x[0, 0, 0, 0], x[0, 0, 0, 1], x[0, 0, 1, 0], x[0, 0, 1, 1]]))
    torch.testing.assert_close(unpack_latents(tokens, 4, 6), x)


@torch.no_grad()
def test_deterministic_sampler_loop_reproduces_the_pipeline(tiny_flow):
    # catches: a wrong timestep conversion (FLUX's / 1000), a schedule that is not the pipeline's
    # (mu, FLUX's linspace sigmas, SD3's shift), wrong packing or position ids, dropped pooled text
    kind, path = tiny_flow
    fam = _load(kind, path)
    shape = fam.latent_shape(32)
    x0 = torch.randn(len(PROMPTS), *shape, generator=torch.Generator().manual_seed(0))
    expected = fam.pipe(PROMPTS, latents=_pipe_latents(kind, x0), output_type="latent", **_pipe_kwargs(kind)).images
    sampler = FlowSDESampler(fam.scheduler_config, 3, noise_level=0.0, **fam.sampler_options(shape))
    cond = fam.encode(PROMPTS)
    x = x0
    for i, t in enumerate(sampler.timesteps):
        out = fam.denoise(fam.denoiser, x, t, cond)
        x = sampler.step(out, torch.full((len(PROMPTS),), i), x).prev_sample
    torch.testing.assert_close(_pipe_latents(kind, x), expected, rtol=1e-5, atol=1e-5)
    # decode: the pipeline's own images from the same start (scale and shift in the right order)
    images = fam.decode(x)
    assert images.shape == (3, 3, 32, 32) and images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1
    ref = fam.pipe(PROMPTS, latents=_pipe_latents(kind, x0), output_type="pt", **_pipe_kwargs(kind)).images
    torch.testing.assert_close(images, ref.float(), rtol=1e-4, atol=1e-4)


def test_lora_save_and_reload_gives_the_same_outputs(tiny_flow, tmp_path):
    # catches: LoRA keys a fresh pipeline's load_lora_weights does not apply (silently), wrong
    # target module names (no adapter on the context stream), a save format without the prefix
    kind, path = tiny_flow
    fam = _load(kind, path)
    transformer = fam.denoiser
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                       target_modules=list(fam.default_lora_targets)))
    names = {n for n, _ in transformer.named_modules() if n.endswith("lora_B.default")}
    assert any("add_q_proj" in n for n in names) and any("to_out.0" in n for n in names)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in transformer.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    x = torch.randn(2, *fam.latent_shape(32), generator=gen)
    cond = fam.encode(PROMPTS[:2])
    t = fam.scheduler_config["num_train_timesteps"] * torch.tensor([0.7, 0.3])
    with torch.no_grad():
        tuned = fam.denoise(transformer, x, t, cond)
    fam.save_lora(get_peft_model_state_dict(transformer), tmp_path / "lora")
    fresh = _load(kind, path)
    with torch.no_grad():
        base = fresh.denoise(fresh.denoiser, x, t, cond)
        fresh.load_lora(tmp_path / "lora")
        reloaded = fresh.denoise(fresh.denoiser, x, t, cond)
    assert (tuned - base).abs().max() > 1e-3  # the adapter changes the output
    torch.testing.assert_close(reloaded, tuned, rtol=1e-5, atol=1e-5)


def test_bad_options_are_rejected(tiny_flow):
    kind, path = tiny_flow
    cls = SD3Family if kind == "sd3" else FluxFamily
    with pytest.raises(ValueError, match="unknown"):
        cls.load(str(path), None, "cpu", torch.float32, max_seq_len=3)
