"""sdpo plan / sdpo train's refusal with FSDP: what sharding divides, what it gathers back, and a
refusal that says the estimate and what to change (FLUX.1-schnell's shipped configs, meta device)."""

import math

import pytest
import torch

from sdpo_core.config import load_config
from sdpo_core.plan import DoesNotFit, GiB, fsdp_units, launch_shards, plan_budget, refusal, refuse_if_too_big


class A(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(10, 10)  # 110 params
        self.inner = B()


class B(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(2, 2)  # 6 params


class Net(torch.nn.Module):
    _no_split_modules = ["A", "B"]

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = A(), B()
        self.head = torch.nn.Linear(3, 3)  # 12 params: the root unit's


def test_fsdp_units_count_a_nested_unit_once():
    # units as accelerate wraps bottom up: B (6), B (6), A without its inner B (110); the root keeps 12
    # (bug caught: A counted with its nested B, 116, or the root counting the blocks' parameters)
    assert fsdp_units(Net()) == (110, 12)


def test_launch_shards_reads_an_fsdp_launch():
    assert launch_shards({"ACCELERATE_USE_FSDP": "true", "WORLD_SIZE": "8"}) == 8
    assert launch_shards({"WORLD_SIZE": "8"}) == 1  # DDP: every process holds the whole model
    assert launch_shards({}) == 1


@pytest.fixture(scope="module")
def flux_full():
    return load_config("flux-schnell-pickscore", ["model.finetune=full"])


def test_flux_full_finetune_is_refused_on_one_gpu_with_what_to_change(flux_full):
    b = plan_budget(flux_full, "flux-schnell-pickscore")
    # 11.9 B float32 weights (44 GiB) + grads and AdamW m, v (133 GiB): far over one 80 GB GPU
    assert b.trainable == 11_891_178_560 and b.peak > 180 * GiB
    why = refusal(b, 80 * GiB)
    assert why.startswith(f"pipeline 'flux-schnell-pickscore' needs ~{b.peak / GiB:.1f} GiB per GPU")
    assert "model.finetune=lora" in why and "model.cache_prompt_embeddings=true" in why
    # the smallest power-of-two FSDP that fits, with its own estimate and the launch command
    assert "FSDP over 4 GPUs" in why and "--num_processes 4" in why
    assert f"~{plan_budget(flux_full, 'f', 4).peak / GiB:.1f} GiB per GPU" in why
    assert plan_budget(flux_full, "f", 2).peak > 80 * GiB >= plan_budget(flux_full, "f", 4).peak
    # gradient checkpointing is already on and the decode outweighs one item's activations: not offered
    assert "gradient_checkpointing" not in why and "train.batch_size=1" not in why

    with pytest.raises(DoesNotFit, match=r"needs ~19\d\.\d GiB per GPU"):
        refuse_if_too_big(flux_full, "flux-schnell-pickscore", total=80 * GiB, shards=1)
    refuse_if_too_big(flux_full, "flux-schnell-pickscore", total=80 * GiB, shards=8)  # fits sharded: no error


def test_fsdp_divides_weights_grads_and_adam_state_and_adds_the_gathered_blocks(flux_full, monkeypatch):
    one, eight = plan_budget(flux_full, "f"), plan_budget(flux_full, "f", 8)
    # one FLUX double-stream block, by hand (hidden 3072, MLP 12288, both streams):
    # attention q,k,v + out: 2 x (3072*9216 + 9216 + 3072*3072 + 3072) = 75,522,048; q/k RMSNorms 4 x 128 = 512;
    # MLP 2 x (3072*12288 + 12288 + 12288*3072 + 3072) = 151,025,664; adaLN 2 x (3072*18432 + 18432) = 113,283,072
    largest, root = eight.unit_params
    assert largest == 75_522_048 + 512 + 151_025_664 + 113_283_072 == 339_831_296
    den = one.weights["transformer"]
    # the root and two blocks in bf16 (the compute dtype), and one block's float32 gradient (full fine-tune)
    assert eight.gathered == (2 * largest + root) * 2 + largest * 4
    assert eight.peak == one.peak - den - one.optimizer + math.ceil(den / 8) + eight.gathered + one.optimizer // 8
    # `sdpo train` under an FSDP accelerate launch reads the process count from the environment
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("WORLD_SIZE", "8")
    refuse_if_too_big(flux_full, "flux-schnell-pickscore", total=80 * GiB)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(DoesNotFit, match="FSDP over 2 processes.*sdpo plan --pipeline flux-schnell-pickscore --gpus 2 --fsdp"):
        refuse_if_too_big(flux_full, "flux-schnell-pickscore", total=80 * GiB)


def test_sdpo_plan_prints_the_sharded_budget(capsys):
    from sdpo_core.cli import main

    args = ["plan", "--pipeline", "flux-schnell-pickscore", "--set", "model.finetune=full", "--gpu-memory", "80"]
    assert main([*args, "--gpus", "8", "--fsdp"]) == 0
    out = capsys.readouterr().out
    assert "the denoiser sharded with FSDP over 8 processes" in out and "float32 / 8" in out
    assert "FSDP blocks gathered to run: root" in out and "fits in 80.0 GiB" in out
    assert main([*args, "--gpus", "8"]) == 0  # DDP: the whole model on every GPU
    out = capsys.readouterr().out
    assert "FSDP over 4 GPUs" in out and "--fsdp: the budget with the denoiser sharded over the 8 GPUs" in out
