"""Cached prompt embeddings (issue 21, item 2; ``model.cache_prompt_embeddings``): the same training
on every tiny family with the cache on and off, and the text encoders freed while training."""

from __future__ import annotations

import json

import pytest
import torch

from sdpo_core.families.lora import lora_state_dict
from sdpo_core.training.callbacks import TrainerCallback
from sdpo_core.training.trainer import Trainer


@pytest.fixture(scope="module")
def family_dirs(tiny_base, tmp_path_factory):
    from sdpo_core.tiny.families import build_tiny_sdxl, save_tiny
    from sdpo_core.tiny.flow import build_tiny_flux, build_tiny_sd3

    root = tmp_path_factory.mktemp("cache_families")
    return {"sd": tiny_base, "sdxl": build_tiny_sdxl(root / "sdxl"),
            "sd3": save_tiny(build_tiny_sd3(seed=0), root / "sd3"),
            "flux": save_tiny(build_tiny_flux(seed=0), root / "flux")}


class Record(TrainerCallback):
    """The text encoders' devices at every optimizer step."""

    def __init__(self) -> None:
        self.devices: set[str] = set()

    def on_optimizer_step(self, trainer) -> None:
        pipe = trainer.family.pipe
        self.devices |= {str(getattr(pipe, n).device) for n in pipe.components
                         if n.startswith("text_encoder") and getattr(pipe, n) is not None}


def train(tiny_cfg, path, run_dir, cache: bool):
    size = ["sample.resolution=32"] if "flux" in str(path) else []
    cfg = tiny_cfg(f"model.pretrained={path}", "sample.num_steps=2", "sample.batch_size=2", "train.batch_size=2",
                   "train.epochs=2", "tracking.log_images_every=100", f"model.cache_prompt_embeddings={cache}",
                   *size)
    rec = Record()
    tr = Trainer(cfg, run_dir, callbacks=[rec])
    tr.run()
    lora = lora_state_dict(tr.acc.unwrap_model(tr.denoiser))
    metrics = (run_dir / "train_metrics.jsonl").read_text().splitlines()
    return lora, metrics, rec.devices


def untimed(lines: list[str]) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if not k.startswith("time")} for line in lines]


@pytest.mark.parametrize("name", ["sd", "sdxl", "sd3", "flux"])
def test_cached_embeddings_train_exactly_as_encoding_each_batch(tiny_cfg, family_dirs, tmp_path, name):
    # catches: a cached row that differs from the batch's encoding (order, dtype, device, the
    # conditioning of another prompt), the encoders still held while training
    lora_off, metrics_off, devices_off = train(tiny_cfg, family_dirs[name], tmp_path / "off", cache=False)
    lora_on, metrics_on, devices_on = train(tiny_cfg, family_dirs[name], tmp_path / "on", cache=True)
    assert devices_off == {"cpu"} and devices_on == {"meta"}
    assert lora_off.keys() == lora_on.keys()
    assert all(torch.equal(lora_off[k], lora_on[k]) for k in lora_off)
    assert untimed(metrics_off) == untimed(metrics_on)  # rewards, losses, ratios: every epoch
