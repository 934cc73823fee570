"""Serving from the registry (issue 21, item 5): every family's trained model registered as the
champion, loaded with ``mlflow.pyfunc.load_model("models:/NAME@champion")`` and asked for images,
which must equal those ``generate`` makes from the same trained directory. On the CPU it loads in
float32; the model config picks the device and dtype (the GPU half is in bench/gpu_run.sh)."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from sdpo_core.config import load_config
from sdpo_core.families.loading import load_family, load_trained, save_trained
from sdpo_core.families.lora import add_lora
from sdpo_core.generate import generate_trajectories, policy_for
from sdpo_core.tiny.families import build_tiny_sdxl
from sdpo_core.tiny.flow import build_tiny_flux, build_tiny_sd3
from sdpo_core.tracking.registry import register_model

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = ["a seven", "a one"]


def base_dir(kind: str, tiny_base: Path, root: Path) -> Path:
    if kind == "sd":
        return tiny_base
    if kind == "sdxl":
        return build_tiny_sdxl(root / "sdxl")
    pipe = build_tiny_sd3(seed=0) if kind == "sd3" else build_tiny_flux(seed=0)
    pipe.save_pretrained(root / kind)
    return root / kind


def trained_run(cfg, base: Path, run_dir: Path) -> None:
    """``run_dir/final``: the base with a (randomly initialised) LoRA, and an eval.json that wins."""
    family = load_family(str(base))
    torch.manual_seed(0)
    add_lora(family.denoiser, 4, None, list(family.default_lora_targets), family.lora_exclude_modules())
    for p in family.denoiser.parameters():  # a LoRA that changes the output (peft starts B at zero)
        if p.requires_grad:
            p.data.normal_(0, 0.5)
    save_trained(family, family.denoiser, run_dir / "final", "lora", base=str(base))
    entry = {"base": {"mean": 0.1, "ci95": [0.05, 0.15], "n": 4},
             "trained": {"mean": 0.5, "ci95": [0.45, 0.55], "n": 4},
             "gain": 0.4, "gain_ci95": [0.3, 0.5], "win_rate": 1.0}
    (run_dir / "eval").mkdir(parents=True)
    (run_dir / "eval" / "eval.json").write_text(
        json.dumps({"pipeline": cfg.pipeline, "reward": cfg.reward.name, "steps": {"1": entry}}))


def expected_images(cfg, final: Path) -> list[np.ndarray]:
    """What the pyfunc must return: generate's images of the trained dir, seeds 0, 1, as uint8."""
    family = load_trained(final)
    policy = policy_for(family, cfg.sample.num_steps, cfg.sample, cfg.model)
    traj = generate_trajectories(family, policy, PROMPTS, [0, 1], cfg.sample.resolution)
    images = (family.decode(traj.x0[:, -1]) * 255).round().to(torch.uint8)
    return [im.permute(1, 2, 0).numpy() for im in images]


def decode_png(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


@pytest.mark.parametrize("kind", ["sd", "sdxl", "sd3", "flux"])
def test_champion_served_from_the_registry(kind, tiny_base, tmp_path, monkeypatch):
    # catches: the pyfunc dropping the trained weights, the family, the sampler or the revision;
    # the device / dtype the model config asks for being ignored
    monkeypatch.chdir(tmp_path)  # MLflow's default artifact root (./mlruns) of the sqlite store
    base = base_dir(kind, tiny_base, tmp_path)
    name = f"serve-{kind}"
    cfg = load_config("tiny-random", [f"model.pretrained={base}", "model.build=null", "tracking.backend=mlflow",
                                      f"register.model_name={name}", "model.revision=main"], ROOT / "pipelines.yaml")
    run_dir = tmp_path / "run"
    trained_run(cfg, base, run_dir)
    reg = register_model(cfg, run_dir, parent_run_id=None)
    assert reg.alias == "champion"

    model = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    served = model.unwrap_python_model()
    assert (served.device.type, served.dtype, served.model_cfg.revision) == ("cpu", torch.float32, "main")
    out = model.predict(pd.DataFrame({"prompt": PROMPTS}), params={"num_steps": cfg.sample.num_steps, "seed": 0})
    got = [decode_png(b) for b in out["image"]]
    want = expected_images(cfg, run_dir / "final")
    assert all(np.array_equal(g, w) for g, w in zip(got, want, strict=True))

    half = mlflow.pyfunc.load_model(f"models:/{name}@champion", model_config={"mixed_precision": "bf16"})
    assert half.unwrap_python_model().family.denoiser.dtype == torch.bfloat16
    assert len(half.predict(pd.DataFrame({"prompt": PROMPTS[:1]}))) == 1


def test_requirements_carry_the_cuda_constraints(tiny_base, tmp_path, monkeypatch):
    # the registered model's requirements pin the tested torch and constrain the CUDA set
    monkeypatch.chdir(tmp_path)
    cfg = load_config("tiny-random", [f"model.pretrained={tiny_base}", "tracking.backend=mlflow",
                                      "register.model_name=serve-reqs"], ROOT / "pipelines.yaml")
    run_dir = tmp_path / "run"
    trained_run(cfg, tiny_base, run_dir)
    register_model(cfg, run_dir, parent_run_id=None)
    local = Path(mlflow.artifacts.download_artifacts("models:/serve-reqs@champion"))
    reqs = (local / "requirements.txt").read_text().splitlines()
    assert "-c constraints.txt" in reqs and any(r.startswith("torch==") and "+" not in r for r in reqs)
    def pins(text: str) -> list[str]:
        return [line for line in text.splitlines() if line and not line.startswith("#")]
    assert pins((local / "constraints.txt").read_text()) == pins((ROOT / "constraints-cuda.txt").read_text())
