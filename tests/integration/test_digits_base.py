"""The digits-tiny builder on a tiny budget: a loadable, deterministic, reused pipeline dir."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from diffusers import StableDiffusionPipeline

from sdpo_core.families.loading import load_family
from sdpo_core.tiny.repro import BUILD_THREADS
from sdpo_core.tiny.train_base import build_digits_base


def _build_with_caller_threads(threads: int, out, **kwargs):
    """Build while the caller runs ``threads`` intra-op threads (as a machine with that many cores
    would); the caller's setting must be back afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        path = build_digits_base(out, steps=30, vae_steps=20, progress=False, **kwargs)
        assert torch.get_num_threads() == threads  # the build's fixed count does not leak out
        return path
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits-base") / "base"
    return _build_with_caller_threads(1, out, eval_per_digit=2)


def _sample(pipe: StableDiffusionPipeline, seed: int) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    gen = torch.Generator().manual_seed(seed)
    return pipe(
        ["a handwritten digit 7", "the number two"],
        num_inference_steps=2,
        eta=1.0,
        guidance_scale=1.0,
        output_type="pt",
        generator=gen,
    ).images


@pytest.mark.slow
def test_build_writes_loadable_pipeline(built):
    names = {p.name for p in built.iterdir()}
    assert {
        "model_index.json",
        "unet",
        "vae",
        "text_encoder",
        "tokenizer",
        "scheduler",
        "classifier",
        "build_info.json",
    } <= names
    assert not list(built.rglob("*.bin")) and not list(built.rglob("*.pkl"))  # safetensors only
    assert not [p for p in built.parent.iterdir() if p.name.startswith(".")]  # no temp dir left
    info = json.loads((built / "build_info.json").read_text())
    assert info["unet_steps"] == 30 and info["vae_steps"] == 20 and info["seed"] == 0
    assert set(info["eval"]["by_steps"]) == {"1", "2", "4", "8", "real"}
    assert info["classifier"]["test_accuracy"] > 0.9

    pipe = StableDiffusionPipeline.from_pretrained(built, safety_checker=None)
    assert pipe.vae.config.scaling_factor == pytest.approx(info["scaling_factor"])
    images = _sample(pipe, seed=3)
    assert images.shape == (2, 3, 32, 32) and 0 <= images.min() and images.max() <= 1
    assert torch.equal(images, _sample(pipe, seed=3))

    loaded = load_family(str(built)).pipe
    assert loaded.scheduler.config.timestep_spacing == "trailing"
    assert loaded.scheduler.config.prediction_type == "epsilon"
    assert torch.equal(_sample(loaded, seed=3), _sample(loaded, seed=3))


@pytest.mark.slow
def test_second_build_reuses(built):
    stamp = (built / "model_index.json").stat().st_mtime_ns
    weights = (built / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    assert build_digits_base(built, steps=30, vae_steps=20, progress=False) == built
    assert (built / "model_index.json").stat().st_mtime_ns == stamp
    assert (built / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns == weights


@pytest.mark.slow
def test_same_seed_same_weights(built, tmp_path):
    """Training is deterministic: a second build with the same seed gives identical weights, also
    when the caller runs another number of threads (1 for the first build, 3 here: float sums
    split across threads round differently, and the difference grows with every step)."""
    again = tmp_path / "again"
    # the classifier has its own fixed seed (tested in the unit tests): reuse it to save ~10 s
    shutil.copytree(built / "classifier", again / "classifier")
    _build_with_caller_threads(3, again, eval_per_digit=1)
    from safetensors.torch import load_file

    for part in ("unet/diffusion_pytorch_model", "vae/diffusion_pytorch_model", "text_encoder/model"):
        a, b = load_file(built / f"{part}.safetensors"), load_file(again / f"{part}.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a), part
    info = json.loads((again / "build_info.json").read_text())
    assert info["environment"]["threads"] == BUILD_THREADS  # recorded: what the bits depend on
