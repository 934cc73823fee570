"""Fewer host operations per denoiser call without changing a bit of what the trainer computes."""

from __future__ import annotations

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch.profiler import ProfilerActivity, profile

from sdpo_core.training.trainer import Trainer


def _aten_ops(fn) -> int:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(1 for e in prof.events() if e.name.startswith("aten::"))


def _set_input_cast(tr: Trainer, on: bool) -> None:
    for m in tr.acc.unwrap_model(tr.denoiser).modules():
        if isinstance(m, BaseTunerLayer):
            m.cast_input_dtype_enabled = on


def test_bf16_lora_skips_the_input_cast_round_trip_bit_exactly(tiny_cfg, tmp_path, request):
    # under bf16 autocast peft's cast of each adapted layer's input to float32 is undone by
    # autocast before the matmul: the trainer turns it off, and the forward output, the loss and
    # every LoRA gradient stay bit-identical to peft's default with fewer operations per call
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    request.addfinalizer(lambda: AcceleratorState._reset_state(reset_partial_state=True))
    tr = Trainer(tiny_cfg("model.mixed_precision=bf16", "sample.num_steps=2"), tmp_path)
    layers = [m for m in tr.acc.unwrap_model(tr.denoiser).modules() if isinstance(m, BaseTunerLayer)]
    assert layers and not any(m.cast_input_dtype_enabled for m in layers)
    s = tr.sample_epoch(0).samples
    rows, steps = torch.arange(2), torch.tensor([0, 1])
    x, t, cond = s.latents[0][:, 0], tr.policy.timesteps[0], s.cond

    def run():
        with torch.no_grad():
            out = tr.policy.denoise(x, t, cond)
        loss, _ = tr.updater.batch_loss(s, rows, steps)
        tr.acc.backward(loss)
        grads = [p.grad.clone() for p in tr.trainable]
        tr.optimizer.zero_grad(set_to_none=True)
        return out, loss.detach(), grads

    fast = run()
    fast_ops = _aten_ops(run)
    _set_input_cast(tr, True)  # peft's default
    slow = run()
    slow_ops = _aten_ops(run)
    assert torch.equal(fast[0], slow[0]) and torch.equal(fast[1], slow[1])
    assert all(torch.equal(a, b) for a, b in zip(fast[2], slow[2], strict=True))
    assert fast_ops < slow_ops - 2 * len(layers)  # at least a cast per layer forward and backward


def test_model_compile_compiles_the_trainers_denoiser_in_place(tiny_cfg, tmp_path):
    # the compile itself happens at the first call (minutes on a CPU, BENCHMARKS 5d): here only that
    # the option reaches the module every trainer call goes through, with its LoRA keys unchanged
    eager = Trainer(tiny_cfg(), tmp_path / "eager")
    tr = Trainer(tiny_cfg("model.compile=true"), tmp_path / "compiled")
    model = tr.acc.unwrap_model(tr.denoiser)
    assert model._compiled_call_impl is not None
    assert eager.acc.unwrap_model(eager.denoiser)._compiled_call_impl is None
    assert list(tr.lora_params) == list(eager.lora_params)
