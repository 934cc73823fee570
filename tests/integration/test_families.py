"""Families on tiny SD, SDXL and LCM pipelines built in code: against the diffusers pipelines themselves."""

import json

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    LatentConsistencyModelPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)

from sdpo_core.families import FAMILIES, family_for
from sdpo_core.families.hub import ModelLoadError, freeze_pipeline, open_pipeline
from sdpo_core.families.lora import add_lora, lora_state_dict
from sdpo_core.families.sd import SDFamily
from sdpo_core.families.sdxl import SDXLFamily
from sdpo_core.samplers import build_sampler
from sdpo_core.tiny.families import build_tiny_lcm, build_tiny_sdxl

PROMPTS = ["a cat", "a red dog", "tree"]


@pytest.fixture(scope="module")
def dirs(tiny_base, tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {"sd": tiny_base, "sdxl": build_tiny_sdxl(root / "sdxl"), "lcm": build_tiny_lcm(root / "lcm")}


def _load(dirs, kind, **options):
    return family_for(str(dirs[kind])).load(str(dirs[kind]), None, "cpu", torch.float32, **options)


def _run(fam, sampler, cond, x, generator):
    for i, t in enumerate(sampler.timesteps):
        x = sampler.step(fam.denoise(fam.denoiser, x, t, cond), i, x, generator=generator).prev_sample
    return x


def test_family_for_reads_model_index(dirs, tmp_path):
    # catches: a pipeline class mapped to the wrong family (LCM dirs name LatentConsistencyModelPipeline)
    assert family_for(str(dirs["sd"])) is SDFamily
    assert family_for(str(dirs["sdxl"])) is SDXLFamily
    assert family_for(str(dirs["lcm"])) is SDFamily
    assert family_for(str(dirs["sd"]), "sdxl") is SDXLFamily
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline"}))
    with pytest.raises(ValueError, match="KandinskyPipeline.*supported: .*StableDiffusionXLPipeline"):
        family_for(str(tmp_path))
    with pytest.raises(ValueError, match="model.family 'sd9'.*known"):
        family_for(str(dirs["sd"]), "sd9")
    with pytest.raises(ModelLoadError, match="cannot load model .nobody/not-in-the-cache.*local diffusers directory"):
        family_for("nobody/not-in-the-cache")
    assert set(FAMILIES) >= {"sd", "sdxl"}


def test_the_one_loader_freezes_and_casts(dirs, tmp_path):
    # catches: a trainable or train-mode base module, the denoiser cast to half precision, a
    # component left out of the training dtype
    dtypes = {"default": torch.bfloat16, "unet": torch.float32, "vae": torch.float32}
    pipe = open_pipeline(StableDiffusionXLPipeline, str(dirs["sdxl"]), dtypes=dtypes)
    # read straight into the training dtypes (no float32 copy first)
    assert pipe.text_encoder.dtype == torch.bfloat16 and pipe.unet.dtype == torch.float32
    freeze_pipeline(pipe, "cpu", dtypes)
    modules = {n: m for n, m in pipe.components.items() if isinstance(m, torch.nn.Module)}
    assert set(modules) == {"unet", "vae", "text_encoder", "text_encoder_2"}
    assert all(not p.requires_grad for m in modules.values() for p in m.parameters())
    assert not any(m.training for m in modules.values())
    assert {n: m.dtype for n, m in modules.items()} == {
        "unet": torch.float32, "vae": torch.float32, "text_encoder": torch.bfloat16, "text_encoder_2": torch.bfloat16}
    (tmp_path / "model_index.json").mkdir()
    with pytest.raises(ModelLoadError, match="not a diffusers pipeline directory"):
        open_pipeline(StableDiffusionXLPipeline, str(tmp_path))


def test_sd_family_and_ddim_sampler_reproduce_the_pipeline(dirs):
    # catches: conditioning, timesteps, denoiser call or the DDIM noise draw differing from diffusers' pipe()
    fam = _load(dirs, "sd")
    cond = fam.encode(PROMPTS)
    assert set(cond.tensors) == {"encoder_hidden_states"} and len(cond) == 3
    sampler = build_sampler(fam.scheduler_config, 2, eta=1.0, last_step="clamp")
    x_T = torch.randn(3, *fam.latent_shape(None), generator=torch.Generator().manual_seed(0))
    ours = _run(fam, sampler, cond, x_T, torch.Generator().manual_seed(7))
    pipe = StableDiffusionPipeline.from_pretrained(dirs["sd"], safety_checker=None)
    ref = pipe(PROMPTS, num_inference_steps=2, guidance_scale=1.0, eta=1.0, latents=x_T,
               generator=torch.Generator().manual_seed(7), output_type="latent").images
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("scale", [None, 3.0])
def test_lcm_family_and_sampler_reproduce_the_lcm_pipeline(dirs, scale):
    # catches: timestep_cond missing or built from w instead of w - 1, a default scale other than the
    # pipeline's, LCM timesteps / boundary condition / noise draw differing from LCMScheduler.step
    fam = _load(dirs, "lcm", **({} if scale is None else {"lcm_guidance_scale": scale}))
    cond = fam.encode(PROMPTS)
    sampler = build_sampler(fam.scheduler_config, 3, last_step="deterministic")
    x_T = torch.randn(3, *fam.latent_shape(None), generator=torch.Generator().manual_seed(1))
    ours = _run(fam, sampler, cond, x_T, torch.Generator().manual_seed(3))
    pipe = LatentConsistencyModelPipeline.from_pretrained(dirs["lcm"], safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    kwargs = {} if scale is None else {"guidance_scale": scale}
    ref = pipe(PROMPTS, num_inference_steps=3, latents=x_T, generator=torch.Generator().manual_seed(3),
               output_type="latent", **kwargs).images
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)
    other = _load(dirs, "lcm", lcm_guidance_scale=1.5)
    t = sampler.timesteps[0]
    assert not torch.allclose(fam.denoise(fam.denoiser, x_T, t, cond), other.denoise(other.denoiser, x_T, t, cond))


def test_sdxl_encode_matches_the_pipelines_own(dirs):
    # catches: last instead of penultimate hidden states, pooled from the wrong encoder, wrong time ids
    fam = _load(dirs, "sdxl")
    cond = fam.encode(PROMPTS)
    assert set(cond.tensors) == {"encoder_hidden_states", "text_embeds", "time_ids"} and len(cond) == 3
    pipe = fam.pipe
    embeds, _, pooled, _ = pipe.encode_prompt(PROMPTS, device="cpu", num_images_per_prompt=1,
                                              do_classifier_free_guidance=False)
    time_ids = pipe._get_add_time_ids((32, 32), (0, 0), (32, 32), embeds.dtype,
                                      text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
    torch.testing.assert_close(cond.tensors["encoder_hidden_states"], embeds)
    torch.testing.assert_close(cond.tensors["text_embeds"], pooled)
    torch.testing.assert_close(cond.tensors["time_ids"], time_ids.repeat(3, 1))
    assert fam.latent_shape(None) == (4, 8, 8)
    with pytest.raises(ValueError, match="resolution=64"):
        fam.latent_shape(64)
    assert _load(dirs, "sdxl", resolution=64).encode(PROMPTS[:1]).tensors["time_ids"].tolist() == [
        [64, 64, 0, 0, 64, 64]]


def test_sdxl_family_reproduces_the_pipeline_under_ddim(dirs):
    # catches: added_cond_kwargs (text_embeds / time_ids) not passed, or passed differently from pipe()
    fam = _load(dirs, "sdxl")
    cond = fam.encode(PROMPTS)
    sampler = build_sampler(fam.scheduler_config, 2, eta=1.0, last_step="clamp")  # from EulerAncestral's config
    x_T = torch.randn(3, *fam.latent_shape(None), generator=torch.Generator().manual_seed(2))
    ours = _run(fam, sampler, cond, x_T, torch.Generator().manual_seed(4))
    pipe = StableDiffusionXLPipeline.from_pretrained(dirs["sdxl"])
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, set_alpha_to_one=False)  # = clamp
    ref = pipe(PROMPTS, height=32, width=32, num_inference_steps=2, guidance_scale=1.0, eta=1.0, latents=x_T,
               generator=torch.Generator().manual_seed(4), output_type="latent").images
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["sd", "sdxl", "lcm"])
def test_lora_saved_by_the_family_loads_with_load_lora_weights(dirs, kind, tmp_path):
    # catches: LoRA keys or format the pipeline's load_lora_weights does not apply (silently or not)
    fam = _load(dirs, kind)
    add_lora(fam.denoiser, rank=4, alpha=None, target_modules=list(fam.default_lora_targets))
    gen = torch.Generator().manual_seed(0)
    for p in fam.denoiser.parameters():
        if p.requires_grad:
            p.data += 0.2 * torch.randn(p.shape, generator=gen)
    cond = fam.encode(PROMPTS[:2])
    x = torch.randn(2, *fam.latent_shape(None), generator=gen)
    t = torch.tensor([999, 499])
    with torch.no_grad():
        tuned = fam.denoise(fam.denoiser, x, t, cond)
        fam.save_lora(lora_state_dict(fam.denoiser), tmp_path / "lora")
        fresh = _load(dirs, kind)
        base = fresh.denoise(fresh.denoiser, x, t, cond)
        fresh.load_lora(tmp_path / "lora")
        loaded = fresh.denoise(fresh.denoiser, x, t, cond)
    assert (tuned - base).abs().max() > 1e-3
    torch.testing.assert_close(loaded, tuned, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["sd", "sdxl", "lcm"])
def test_decode_gives_float_images_in_unit_range(dirs, kind):
    # catches: VAE scaling not undone ([-1, 1] or unscaled output), wrong shape
    fam = _load(dirs, kind)
    images = fam.decode(torch.randn(2, *fam.latent_shape(None)))
    assert images.shape == (2, 3, 32, 32) and images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1 and images.std() > 0


def test_sdxl_vae_stays_float32_in_fp16_unless_replaced(dirs, tmp_path):
    # catches: SDXL's force_upcast VAE cast to fp16 (it overflows), or the replacement VAE option ignored
    half = SDXLFamily.load(str(dirs["sdxl"]), None, "cpu", torch.float16)
    assert half.pipe.vae.dtype == torch.float32 and half.pipe.text_encoder_2.dtype == torch.float16
    full = _load(dirs, "sdxl")
    latents = torch.randn(1, 4, 8, 8)
    torch.testing.assert_close(half.decode(latents.half()), full.decode(latents.half().float()))
    fixed = type(full.pipe.vae).from_config(full.pipe.vae.config, force_upcast=False)
    fixed.save_pretrained(tmp_path / "vae")
    swapped = SDXLFamily.load(str(dirs["sdxl"]), None, "cpu", torch.float16, vae=str(tmp_path / "vae"))
    assert swapped.pipe.vae.dtype == torch.float16 and not swapped.pipe.vae.config.force_upcast
    with pytest.raises(ModelLoadError, match="replacement VAE"):
        SDXLFamily.load(str(dirs["sdxl"]), None, "cpu", torch.float32, vae=str(tmp_path / "nothing"))


def test_set_denoiser_replaces_the_unet_denoise_uses(dirs, tmp_path):
    # catches: set_denoiser leaving the old UNet in the pipeline, or the new one trainable / in train mode
    fam = _load(dirs, "sd")
    other = type(fam.denoiser).from_config(fam.denoiser.config)  # fresh random weights
    fam.set_denoiser(other)
    assert fam.denoiser is other and fam.pipe.unet is other
    assert not other.training and not any(p.requires_grad for p in other.parameters())
    cond, x = fam.encode(PROMPTS[:1]), torch.randn(1, *fam.latent_shape(None))
    with torch.no_grad():
        torch.testing.assert_close(fam.denoise(fam.denoiser, x, 999, cond),
                                   other(x, 999, encoder_hidden_states=cond.tensors["encoder_hidden_states"]).sample)
