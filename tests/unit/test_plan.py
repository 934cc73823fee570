"""sdpo plan: exact parameter counts from shipped configs on the meta device, and the fit decision."""

import pytest
import torch

from sdpo_core.config import load_config
from sdpo_core.plan import DoesNotFit, GiB, plan_budget, refusal, refuse_if_too_big


def test_sd_turbo_unet_weights_match_the_released_model():
    # stabilityai/sd-turbo's UNet (SD 2.1-base): 865,910,724 parameters, fp16 -> 1.73 GB
    b = plan_budget(load_config("sd-turbo-aesthetic"), "sd-turbo-aesthetic")
    n, dtype = b.params["unet"]
    assert n == 865_910_724 and dtype == "float16"
    assert b.weights["unet"] == 2 * n
    assert b.params["text_encoder"][0] > 300_000_000  # OpenCLIP ViT-H text tower, not a stub


def test_refusal_names_what_makes_it_fit():
    b = plan_budget(load_config("sd-turbo-aesthetic"), "sd-turbo-aesthetic")
    assert refusal(b, 80 * GiB) is None
    why = refusal(b, 8 * GiB)
    assert "gradient_checkpointing=true" in why and "FSDP" in why


def test_checkpointing_keeps_less_and_the_cpu_skips_the_train_check():
    cfg = load_config("sd-turbo-aesthetic", ["sample.batch_size=512", "train.batch_size=512", "train.gradient_accumulation_steps=1"])
    b = plan_budget(cfg, "sd-turbo-aesthetic")
    assert b.activations_other < b.activations  # checkpointing (the other setting) keeps less
    assert refusal(b, 80 * GiB)  # 1024 trajectories per backward do not fit one 80 GB GPU
    assert not torch.cuda.is_available()
    refuse_if_too_big(cfg, "sd-turbo-aesthetic")  # no CUDA: nothing to check against, no refusal


def test_train_refuses_with_the_plans_numbers():
    # the decision `sdpo train` takes on a GPU, given the GPU's size (no GPU here)
    cfg = load_config("sd-turbo-aesthetic")
    refuse_if_too_big(cfg, "sd-turbo-aesthetic", total=80 * GiB)  # fits: no error
    with pytest.raises(DoesNotFit) as err:
        refuse_if_too_big(cfg, "sd-turbo-aesthetic", total=8 * GiB)
    b = plan_budget(cfg, "sd-turbo-aesthetic")
    assert str(err.value).startswith(refusal(b, 8 * GiB)) and f"~{b.peak / GiB:.1f} GiB" in str(err.value)
    assert "sdpo plan --pipeline sd-turbo-aesthetic" in str(err.value)
