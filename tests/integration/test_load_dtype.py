"""Loading in the training dtype (issue 21, item 1): weights are read straight into it.

Each family's tiny pipeline, with a denoiser large enough that weights dominate, is saved in bf16 (as
FLUX.1 and SD3.5 ship on the hub; SD-Turbo / SDXL-Turbo ship fp16 variants) and loaded in a fresh
process, its peak resident memory (VmHWM, reset before the load) measured while every weight is read
once (as moving them to a GPU does). A float32 load upcasts the file: twice its bytes, plus the file;
a bf16 load reads it as it is.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from diffusers import FluxTransformer2DModel, UNet2DConditionModel

from sdpo_core.tiny.families import build_tiny_sdxl_pipeline
from sdpo_core.tiny.flow import build_tiny_flux, build_tiny_sd3
from sdpo_core.tiny.random_model import TinySizes, build_tiny_pipeline

WORDS = ["a", "cat", "dog", "red", "tree"]

# a fresh process: load the family once small (imports, lazy modules), then measure the big load
MEASURE = r"""
import json, sys, torch
from sdpo_core.families.loading import load_family
def kib(key):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key))
small, big, name = sys.argv[1:]
dtype = getattr(torch, name)
load_family(small, dtype=dtype, denoiser_dtype=dtype)
open("/proc/self/clear_refs", "w").write("5")  # resets VmHWM to the current RSS
before = kib("VmRSS:")
fam = load_family(big, dtype=dtype, denoiser_dtype=dtype)
modules = [m for m in fam.pipe.components.values() if isinstance(m, torch.nn.Module)]
dtypes = sorted({str(p.dtype) for m in modules for p in m.parameters()})
total = sum(float(p.float().sum()) for m in modules for p in m.parameters())  # every weight read
print(json.dumps({"peak_mib": (kib("VmHWM:") - before) / 1024, "dtypes": dtypes}))
"""


def big_pipeline(kind: str):
    """The family's tiny pipeline with a ~30M-parameter denoiser (about 60 MB in bf16)."""
    torch.manual_seed(0)
    if kind == "sd":
        return build_tiny_pipeline(TinySizes(unet_channels=(192, 384), words=WORDS))
    if kind == "sdxl":
        pipe = build_tiny_sdxl_pipeline(WORDS)
        pipe.unet = UNet2DConditionModel.from_config(pipe.unet.config, block_out_channels=(192, 384))
        return pipe
    if kind == "sd3":
        return build_tiny_sd3(words=WORDS, num_layers=8, attention_head_dim=32, num_attention_heads=16)
    pipe = build_tiny_flux(words=WORDS)
    pipe.transformer = FluxTransformer2DModel.from_config(
        pipe.transformer.config, num_layers=3, num_single_layers=3, num_attention_heads=64)
    return pipe


def small_pipeline(kind: str):
    return {"sd": lambda: build_tiny_pipeline(TinySizes(words=WORDS)), "sdxl": lambda: build_tiny_sdxl_pipeline(WORDS),
            "sd3": lambda: build_tiny_sd3(words=WORDS), "flux": lambda: build_tiny_flux(words=WORDS)}[kind]()


def measure(small, big, dtype: str) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DIFFUSERS_VERBOSITY": "error", "TRANSFORMERS_VERBOSITY": "error"}
    out = subprocess.run([sys.executable, "-c", MEASURE, str(small), str(big), dtype], env=env,
                         capture_output=True, text=True, timeout=600, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.parametrize("kind", ["sd", "sdxl", "sd3", "flux"])
def test_loading_in_bf16_peaks_at_half_of_float32_or_less(kind, tmp_path):
    # catches: from_pretrained without the dtype (a float32 copy of every weight first), a module
    # left out of the dtype map, the loader casting after it copied
    small, big = tmp_path / "small", tmp_path / "big"
    small_pipeline(kind).save_pretrained(small)
    pipe = big_pipeline(kind).to(torch.bfloat16)
    pipe.save_pretrained(big)
    weights_mib = sum(p.numel() * 2 for m in pipe.components.values() if isinstance(m, torch.nn.Module)
                      for p in m.parameters()) / 2**20
    del pipe
    f32, bf16 = measure(small, big, "float32"), measure(small, big, "bfloat16")
    assert f32["dtypes"] == ["torch.float32"] and bf16["dtypes"] == ["torch.bfloat16"]
    print(f"{kind}: bf16 weights {weights_mib:.0f} MiB; peak over the load: float32 {f32['peak_mib']:.0f} MiB, "
          f"bf16 {bf16['peak_mib']:.0f} MiB, ratio {bf16['peak_mib'] / f32['peak_mib']:.2f}")
    assert f32["peak_mib"] > 1.8 * weights_mib  # the measurement sees the float32 copy
    assert bf16["peak_mib"] < 0.55 * f32["peak_mib"]
