"""model.base_lora: a few-step LoRA fused into the base before training (e.g. SDXL + LCM-LoRA)."""

from __future__ import annotations

import pytest
import torch
from peft.utils import get_peft_model_state_dict

from sdpo_core.families import loading
from sdpo_core.families.hub import ModelLoadError
from sdpo_core.families.lora import add_lora
from sdpo_core.generate import generate_trajectories, policy_for
from sdpo_core.training.trainer import Trainer

PROMPTS = ["a handwritten digit 3", "the number seven"]


@pytest.fixture(scope="module")
def lora_dir(tiny_base, tmp_path_factory):
    """A LoRA of the tiny base in diffusers' format, with non-zero weights (a stand-in for LCM-LoRA)."""
    fam = loading.load_family(str(tiny_base))
    add_lora(fam.denoiser, 4, None, list(fam.default_lora_targets))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in fam.denoiser.named_parameters():
            if "lora_" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    out = tmp_path_factory.mktemp("base_lora")
    fam.save_lora(get_peft_model_state_dict(fam.denoiser), out)
    return out


def _traj(fam, cfg):
    return generate_trajectories(fam, policy_for(fam, 2, cfg.sample, cfg.model), PROMPTS, [1, 2], None)


def test_training_starts_from_the_base_with_the_lora_fused(tiny_cfg, tiny_base, lora_dir, tmp_path):
    cfg = tiny_cfg(f"model.base_lora={lora_dir}", "train.epochs=1", "tracking.log_images_every=100")
    tr = Trainer(cfg, tmp_path, train_prompts=PROMPTS)
    # the same model as diffusers' own unfused LoRA on the base (the training LoRA starts at zero)
    unfused = loading.load_family(str(tiny_base))
    unfused.pipe.load_lora_weights(str(lora_dir))
    # fused and unfused agree to float32 rounding of the merged weights
    torch.testing.assert_close(_traj(tr.family, cfg).latents, _traj(unfused, cfg).latents, atol=1e-4, rtol=1e-4)
    plain = loading.load_family(str(tiny_base))
    assert not torch.allclose(_traj(tr.family, cfg).latents, _traj(plain, cfg).latents, atol=1e-3)
    # only the training LoRA is an adapter: what trains and what is saved is that one alone
    assert all("sdpo_base_lora" not in n for n, _ in tr.family.denoiser.named_parameters())
    final = tr.run()
    again = loading.load_trained(final)  # sdpo_model.json names the base LoRA: fused again on reload
    torch.testing.assert_close(_traj(again, cfg).latents, _traj(tr.family, cfg).latents, atol=1e-5, rtol=1e-5)


def test_a_missing_base_lora_is_named(tiny_base, tmp_path):
    with pytest.raises(ModelLoadError, match="model.base_lora .*nowhere"):
        loading.load_family(str(tiny_base), base_lora=str(tmp_path / "nowhere"))
