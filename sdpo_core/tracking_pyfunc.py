"""The registered model as MLflow "models from code": this file is logged with the model and run
by MLflow when the model loads (never imported by sdpo itself), so no pickle is involved.

It loads the base pipeline (the ``base`` artifact when the model carries one, else the hub id or
path in the model config) with the trained weights (the ``trained`` artifact) and turns prompts into
PNG images::

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
        from sdpo_core.models import load_trained

        cfg = context.model_config or {}
        base = context.artifacts.get("base") or cfg["base_model"]
        self.defaults = {k: cfg[k] for k in ("num_steps", "seed", "eta", "guidance_scale")}
        self.pipe: Any = load_trained(  # a diffusers pipeline (its __call__ is untyped)
            context.artifacts["trained"], base=base, timestep_spacing=cfg.get("timestep_spacing")
        )

    def predict(self, context, model_input, params: dict[str, Any] | None = None):
        import pandas as pd
        import torch

        prompts = [
            str(p) for p in (model_input["prompt"] if hasattr(model_input, "columns") else model_input)
        ]
        p = {**self.defaults, **(params or {})}
        # one generator per image, seeded seed + i: an image does not depend on its batch
        generators = [torch.Generator("cpu").manual_seed(int(p["seed"]) + i) for i in range(len(prompts))]
        images = self.pipe(
            prompts,
            num_inference_steps=int(p["num_steps"]),
            eta=float(p["eta"]),
            guidance_scale=float(p["guidance_scale"]),
            generator=generators,
            output_type="pil",
        ).images
        return pd.DataFrame({"image": [_png_base64(img) for img in images]})


def _png_base64(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


mlflow.models.set_model(SdpoImageModel())
