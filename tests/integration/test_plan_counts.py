"""``sdpo plan`` against the real loader: on tiny pipelines of every family, the parameter counts and
dtypes it reads from the configs on the meta device equal those of the modules the loader builds,
and its LoRA count equals the trainer's adapter."""

import pytest
import torch

from sdpo_core.config import load_config
from sdpo_core.families.loading import load_for_config
from sdpo_core.families.lora import add_lora
from sdpo_core.plan import plan_budget
from sdpo_core.tiny.build import build_random_tiny
from sdpo_core.tiny.families import build_tiny_lcm, build_tiny_sdxl, save_tiny
from sdpo_core.tiny.flow import build_tiny_flux, build_tiny_sd3

BUILDERS = {
    "sd": build_random_tiny,
    "lcm": build_tiny_lcm,
    "sdxl": build_tiny_sdxl,
    "sd3": lambda out: save_tiny(build_tiny_sd3(), out),
    "flux": lambda out: save_tiny(build_tiny_flux(), out),
}


@pytest.mark.parametrize("kind", sorted(BUILDERS))
@pytest.mark.parametrize("finetune,precision", [("lora", "bf16"), ("full", "fp16")])
def test_counts_and_dtypes_equal_the_loaded_model(kind, finetune, precision, tmp_path):
    model_dir = BUILDERS[kind](tmp_path / kind)
    cfg = load_config("tiny-random", [f"model.pretrained={model_dir}", f"model.finetune={finetune}",
                                      f"model.mixed_precision={precision}", "sample.resolution=32"])
    budget = plan_budget(cfg, "tiny")

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    denoiser_dtype = dtype if finetune == "lora" else torch.float32
    family = load_for_config(cfg.model, "cpu", dtype, 32, denoiser_dtype)
    loaded = {name: (sum(p.numel() for p in m.parameters()), str(next(m.parameters()).dtype).removeprefix("torch."))
              for name, m in family.pipe.components.items() if isinstance(m, torch.nn.Module)}
    assert budget.params == loaded

    m = cfg.model
    if finetune == "lora":
        add_lora(family.denoiser, m.lora_rank, m.lora_alpha, list(family.default_lora_targets),
                 family.lora_exclude_modules())
    trained = sum(p.numel() for p in family.denoiser.parameters() if p.requires_grad or finetune == "full")
    assert budget.trainable == trained > 0
