"""The registered model as MLflow "models from code": this file is logged with the model and run
by MLflow when the model loads (never imported by sdpo itself), so no pickle is involved.

It loads the base model as its family (the ``base`` artifact when the model carries one, else the
hub id or path in the model config) with the trained weights (the ``trained`` artifact) and turns
prompts into PNG images, sampled with the sampler training used (the model config's ``sample``).
It loads on a GPU when there is one, in training's dtype (``model.mixed_precision``), and on the
CPU in float32 otherwise; the model config's ``device`` and ``mixed_precision`` choose otherwise,
at load time too (``load_model(uri, model_config={"device": "cuda:1"})``)::

    model = mlflow.pyfunc.load_model("models:/sdpo-digits-tiny@champion")
    out = model.predict(pd.DataFrame({"prompt": ["a seven"]}), params={"num_steps": 2, "seed": 0})
    png_bytes = base64.b64decode(out["image"][0])
"""

from __future__ import annotations

import base64
import io
from typing import Any

import mlflow
from mlflow.pyfunc import PythonModel


class SdpoImageModel(PythonModel):
    """prompts (DataFrame column ``prompt``) -> DataFrame column ``image``: base64 PNG, one per prompt."""

    def load_context(self, context) -> None:
        from sdpo_core.config import ModelConfig, SampleConfig
        from sdpo_core.families.loading import load_trained

        cfg = context.model_config or {}
        base = context.artifacts.get("base") or cfg["base_model"]
        self.defaults = {k: cfg[k] for k in ("num_steps", "seed", "eta", "guidance_scale")}
        self.sample = SampleConfig(**cfg["sample"])
        self.model_cfg = ModelConfig(**{**cfg["model"], "pretrained": base})
        self.device, self.dtype = serving_device_dtype(cfg)
        self.family: Any = load_trained(context.artifacts["trained"], base=base, device=self.device,
                                        dtype=self.dtype, revision=self.model_cfg.revision,
                                        options=self.model_cfg.family_options, resolution=self.sample.resolution)

    def predict(self, context, model_input, params: dict[str, Any] | None = None):
        import pandas as pd
        import torch

        prompts = [
            str(p) for p in (model_input["prompt"] if hasattr(model_input, "columns") else model_input)
        ]
        p = {**self.defaults, **(params or {})}
        from PIL import Image

        from sdpo_core.generate import generate_trajectories, policy_for

        # the training sampler; one generator per image, seeded seed + i: an image does not depend on its batch
        sample = self.sample.model_copy(update={"eta": float(p["eta"]), "guidance_scale": float(p["guidance_scale"])})
        policy = policy_for(self.family, int(p["num_steps"]), sample, self.model_cfg, self.dtype)
        seeds = [int(p["seed"]) + i for i in range(len(prompts))]
        with torch.no_grad():
            traj = generate_trajectories(self.family, policy, prompts, seeds, sample.resolution)
            images = (self.family.decode(traj.x0[:, -1]) * 255).round().to(torch.uint8).cpu()
        pil = [Image.fromarray(im.permute(1, 2, 0).numpy()) for im in images]
        return pd.DataFrame({"image": [_png_base64(img) for img in pil]})


def serving_device_dtype(cfg: dict[str, Any]) -> tuple[Any, Any]:
    """(device, dtype) to serve on: the model config's ``device`` (default: a GPU if there is one)
    and ``mixed_precision`` (default: training's on a GPU, ``no`` (float32) on the CPU)."""
    import torch

    from sdpo_core.generate import compute_dtype, default_device

    device = torch.device(cfg.get("device") or default_device())
    trained = cfg["model"].get("mixed_precision", "no")
    return device, compute_dtype(cfg.get("mixed_precision") or (trained if device.type == "cuda" else "no"))


def _png_base64(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


mlflow.models.set_model(SdpoImageModel())
