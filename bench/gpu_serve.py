"""Serving the champion on a GPU (issue 21, item 5): for each tiny family, a trained model directory
(a random LoRA, recorded as trained in bf16) is registered in a throw-away MLflow store, loaded with
``mlflow.pyfunc.load_model("models:/NAME@champion")`` and asked for 2 images. Checks that it loaded
on CUDA in bf16 (the model's training dtype) and that a ``model_config`` override to the CPU in
float32 returns images of the same shape. Writes ``--out`` (JSON) and exits 1 on a failed check.

    python bench/gpu_serve.py --out $OUT/gpu_serve.json        # needs mlflow, pandas and a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def trained_run(cfg, base: Path, run_dir: Path) -> None:
    """``run_dir/final`` (the base with a random LoRA, marked bf16) and an eval.json that wins."""
    import torch

    from sdpo_core.families.loading import load_family, save_trained
    from sdpo_core.families.lora import add_lora

    family = load_family(str(base))
    torch.manual_seed(0)
    add_lora(family.denoiser, 4, None, list(family.default_lora_targets), family.lora_exclude_modules())
    save_trained(family, family.denoiser, run_dir / "final", "lora", base=str(base), mixed_precision="bf16")
    entry = {"base": {"mean": 0.1, "ci95": [0.05, 0.15], "n": 4}, "trained": {"mean": 0.5, "ci95": [0.45, 0.55], "n": 4},
             "gain": 0.4, "gain_ci95": [0.3, 0.5], "win_rate": 1.0}
    (run_dir / "eval").mkdir(parents=True)
    (run_dir / "eval" / "eval.json").write_text(json.dumps({"pipeline": cfg.pipeline, "reward": cfg.reward.name,
                                                           "steps": {"1": entry}}))


def serve_case(kind: str, work: Path) -> dict:
    import mlflow
    import pandas as pd

    from sdpo_core.config import load_config
    from sdpo_core.tiny.build import build_random_tiny
    from sdpo_core.tiny.families import build_tiny_sdxl, save_tiny
    from sdpo_core.tiny.flow import build_tiny_flux, build_tiny_sd3
    from sdpo_core.tracking.registry import register_model

    builders = {"sd": lambda d: build_random_tiny(d, seed=0), "sdxl": build_tiny_sdxl,
                "sd3": lambda d: save_tiny(build_tiny_sd3(seed=0), d), "flux": lambda d: save_tiny(build_tiny_flux(seed=0), d)}
    base = builders[kind](work / f"base-{kind}")
    size = ["sample.resolution=32"] if kind == "flux" else []
    cfg = load_config("tiny-random", [f"model.pretrained={base}", "model.build=null", "model.mixed_precision=bf16",
                                      "tracking.backend=mlflow", f"register.model_name=gpu-serve-{kind}", *size],
                      ROOT / "pipelines.yaml")
    trained_run(cfg, base, work / f"run-{kind}")
    register_model(cfg, work / f"run-{kind}", parent_run_id=None)
    start = time.perf_counter()
    model = mlflow.pyfunc.load_model(f"models:/gpu-serve-{kind}@champion")
    load_s = time.perf_counter() - start
    served = model.unwrap_python_model()
    start = time.perf_counter()
    out = model.predict(pd.DataFrame({"prompt": ["a seven", "a one"]}))
    predict_s = time.perf_counter() - start
    cpu = mlflow.pyfunc.load_model(f"models:/gpu-serve-{kind}@champion",
                                   model_config={"device": "cpu", "mixed_precision": "no"})
    cpu_out = cpu.predict(pd.DataFrame({"prompt": ["a seven"]}))
    return {"device": str(served.device), "dtype": str(served.dtype),
            "denoiser_device": str(served.family.denoiser.device), "denoiser_dtype": str(served.family.denoiser.dtype),
            "images": len(out), "cpu_override": [str(cpu.unwrap_python_model().device), len(cpu_out)],
            "load_s": round(load_s, 2), "predict_s": round(predict_s, 2)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="gpu_serve_"))
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work}/mlflow.db"
    os.chdir(work)  # MLflow's default artifact root (./mlruns) of a sqlite store
    results, ok = {}, True
    for kind in ("sd", "sdxl", "sd3", "flux"):
        try:
            r = serve_case(kind, work)
            r["ok"] = (r["device"].startswith("cuda") and r["denoiser_device"].startswith("cuda")
                       and r["denoiser_dtype"] == "torch.bfloat16" and r["images"] == 2 and r["cpu_override"] == ["cpu", 1])
        except Exception as exc:  # one family's failure is recorded, the others still run
            r = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        results[kind], ok = r, ok and r["ok"]
        print(kind, json.dumps(r), flush=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
