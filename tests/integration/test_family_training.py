"""The trainer on every model family: tiny SDXL, LCM, SD3 and FLUX pipelines built in code.

Each is saved and loaded through ``from_pretrained`` (the path a real model takes), its family read
from ``model_index.json`` and its sampler from the scheduler config: nothing in the config names
the family. For each: the ratio is exactly 1 before the first update, two epochs of SDPO and of
DDPO move every LoRA weight and nothing else, the saved LoRA reloads (the family's diffusers
``load_lora_weights``) into a policy that samples what the trained one samples, and evaluation
runs on it.
"""

from __future__ import annotations

import math

import pytest
import torch

from sdpo_core.evaluation.evaluate import evaluate
from sdpo_core.families import loading
from sdpo_core.generate import generate_trajectories, policy_for
from sdpo_core.training.trainer import Trainer

FAMILIES = ["sdxl", "lcm", "sd3", "flux"]
PROMPTS = ["a handwritten digit 3", "the number seven", "an eight", "digit two"]


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    from sdpo_core.tiny.families import build_tiny_lcm, build_tiny_sdxl, save_tiny
    from sdpo_core.tiny.flow import build_tiny_flux, build_tiny_sd3

    root = tmp_path_factory.mktemp("families")
    return {
        "sdxl": build_tiny_sdxl(root / "sdxl"),
        "lcm": build_tiny_lcm(root / "lcm"),
        "sd3": save_tiny(build_tiny_sd3(seed=0), root / "sd3"),
        "flux": save_tiny(build_tiny_flux(seed=0), root / "flux"),
    }


def _cfg(tiny_cfg, path, *extra):
    # FLUX's pipeline default size is 512 px whatever the VAE: the tiny one runs at 32 px like the others
    size = ["sample.resolution=32"] if "flux" in str(path) else []
    return tiny_cfg(f"model.pretrained={path}", "sample.num_steps=2", "sample.batch_size=2", "train.batch_size=2",
                    "tracking.log_images_every=100", *size, *extra)


def _params(tr: Trainer):
    named = dict(tr.acc.unwrap_model(tr.denoiser).named_parameters())
    lora = {n: p.detach().clone() for n, p in named.items() if "lora_" in n}
    frozen = {n: p.detach().clone() for n, p in named.items() if "lora_" not in n}
    return lora, frozen


@pytest.mark.parametrize("method", ["sdpo", "ddpo"])
@pytest.mark.parametrize("name", FAMILIES)
def test_two_epochs_move_every_lora_weight_and_nothing_else(tiny_cfg, family_dirs, tmp_path, name, method):
    tr = Trainer(_cfg(tiny_cfg, family_dirs[name], f"train.method={method}"), tmp_path)
    expected = {"sdxl": "SDXLFamily", "lcm": "SDFamily", "sd3": "SD3Family", "flux": "FluxFamily"}[name]
    assert type(tr.family).__name__ == expected
    lora0, frozen0 = _params(tr)
    assert lora0, "no LoRA weights were added"
    samples = tr.sample_epoch(0).samples
    metrics = tr.train_epoch(samples, 0)
    # the ratio is 1 before the first update (up to float32 summation order across batch layouts)
    assert metrics["check/first_batch_kl"] < 1e-10
    tr.train_epoch(tr.sample_epoch(1).samples, 1)  # a second epoch
    lora1, frozen1 = _params(tr)
    assert all(not torch.equal(lora0[k], lora1[k]) for k in lora0 if "lora_B" in k or "lora_A" in k)
    assert all(torch.equal(frozen0[k], frozen1[k]) for k in frozen0)


@pytest.mark.parametrize("name", FAMILIES)
def test_saved_lora_reloads_into_the_same_policy_and_evaluates(tiny_cfg, family_dirs, tmp_path, name):
    cfg = _cfg(tiny_cfg, family_dirs[name], "train.epochs=2", "train.learning_rate=1e-2",
               "evaluate.steps=[1,2]", "evaluate.num_prompts=2", "evaluate.samples_per_prompt=1")
    tr = Trainer(cfg, tmp_path / "run", train_prompts=PROMPTS)
    final = tr.run()
    seeds = [5, 6]
    trained = generate_trajectories(tr.family, tr.policy, PROMPTS[:2], seeds, cfg.sample.resolution)
    # a fresh base model with the saved LoRA applied by its own diffusers pipeline (load_lora_weights)
    reloaded = loading.load_trained(final)
    assert type(reloaded).__name__ == type(tr.family).__name__
    again = generate_trajectories(reloaded, policy_for(reloaded, 2, cfg.sample, cfg.model), PROMPTS[:2], seeds,
                                  cfg.sample.resolution)
    torch.testing.assert_close(again.latents, trained.latents, atol=1e-5, rtol=1e-5)
    base = loading.load_family(str(family_dirs[name]))
    untrained = generate_trajectories(base, policy_for(base, 2, cfg.sample, cfg.model), PROMPTS[:2], seeds,
                                      cfg.sample.resolution)
    assert not torch.allclose(untrained.latents, trained.latents, atol=1e-4)  # the LoRA did change the model
    result = evaluate(cfg, str(family_dirs[name]), final, PROMPTS, tmp_path / "eval")
    assert set(result["steps"]) == {"1", "2"} and "gain" in result["steps"]["2"]


@pytest.mark.parametrize("name", FAMILIES)
def test_resume_is_bit_exact(tiny_cfg, family_dirs, tmp_path, name):
    # epoch 0, stop, resume for epoch 1 == two epochs in one go, bit for bit
    whole = Trainer(_cfg(tiny_cfg, family_dirs[name], "train.epochs=2"), tmp_path / "whole", train_prompts=PROMPTS)
    whole.run()
    first = Trainer(_cfg(tiny_cfg, family_dirs[name], "train.epochs=1"), tmp_path / "split", train_prompts=PROMPTS)
    first.run()
    rest = Trainer(_cfg(tiny_cfg, family_dirs[name], "train.epochs=2"), tmp_path / "split", train_prompts=PROMPTS)
    rest.run(resume=True)
    a, b = whole.trainable_state(), rest.trainable_state()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", ["sdxl", "lcm", "flux"])
def test_sdpo_generate_on_a_trained_model(tiny_cfg, family_dirs, tmp_path, name):
    import os
    import subprocess
    import sys

    from PIL import Image

    final = Trainer(_cfg(tiny_cfg, family_dirs[name], "train.epochs=1"), tmp_path / "run",
                    train_prompts=PROMPTS).run()
    out = tmp_path / "img.png"
    proc = subprocess.run([sys.executable, "-m", "sdpo_core.cli", "generate", "--model", str(final), "--prompt",
                           PROMPTS[0], "--steps", "2", "--num-images", "2", "--out", str(out)],
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    with Image.open(out) as im:
        assert im.format == "PNG" and im.width > 64


@pytest.mark.parametrize("name", ["sd", *FAMILIES])
def test_nft_two_epochs_move_every_lora_weight_and_nothing_else(tiny_cfg, tiny_base, family_dirs, tmp_path, name):
    # DiffusionNFT through the same trainer: the family's sampler and schedule, the old policy's copy
    path = tiny_base if name == "sd" else family_dirs[name]
    tr = Trainer(_cfg(tiny_cfg, path, "train.method=nft", "train.nft.group_size=4"), tmp_path)
    lora0, frozen0 = _params(tr)
    old0 = {k: v.clone() for k, v in tr.weights.snapshots["old"].items()}
    for epoch in range(2):
        metrics = tr.train_epoch(tr.sample_epoch(epoch).samples, epoch)
        assert all(math.isfinite(metrics[k]) for k in ("loss", "nft/positive", "nft/negative", "kl_ref"))
    lora1, frozen1 = _params(tr)
    assert all(not torch.equal(lora0[k], lora1[k]) for k in lora0)
    assert all(torch.equal(frozen0[k], frozen1[k]) for k in frozen0)
    # the old policy followed the trained weights after each epoch (the paper's decay is ~0 this early)
    assert all(not torch.equal(old0[k], v) for k, v in tr.weights.snapshots["old"].items())


@pytest.mark.parametrize("name", FAMILIES)
def test_kl_and_ema_on_every_family(tiny_cfg, family_dirs, tmp_path, name):
    # train.kl_beta (the per-step Gaussian KL to the starting weights) and train.ema_decay through each
    # family's sampler and export. catches: a family whose transition has no std for the closed form
    # (NaN or a missing kl_ref), a reference equal to the live weights (KL stuck at 0), final/ written
    # from the raw weights instead of the EMA
    import json

    from safetensors.torch import load_file

    tr = Trainer(_cfg(tiny_cfg, family_dirs[name], "train.epochs=2", "train.kl_beta=0.04", "train.ema_decay=0.9",
                      "train.learning_rate=1e-2"), tmp_path, train_prompts=PROMPTS)
    lora0, _ = _params(tr)
    final = tr.run()
    rows = [json.loads(line) for line in (tmp_path / "train_metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1]
    assert all(math.isfinite(r["kl_ref"]) for r in rows) and rows[1]["kl_ref"] > 0
    lora1, _ = _params(tr)
    assert all(not torch.equal(lora0[k], lora1[k]) for k in lora0)
    saved = load_file(str(final / "pytorch_lora_weights.safetensors"))
    ema = {v.numpy().tobytes() for v in tr.weights.snapshots["ema"].values()}
    raw = {v.numpy().tobytes() for v in tr.trainable_state().values()}
    assert len(saved) == len(ema) and all(v.numpy().tobytes() in ema for v in saved.values())
    assert any(v.numpy().tobytes() not in raw for v in saved.values())
