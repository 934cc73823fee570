"""Multi-step evaluation end to end on a tiny random pipeline saved to disk (CPU, no downloads)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from PIL import Image
from scipy import stats

from sdpo_core.config import validate_dict
from sdpo_core.evaluation.evaluate import EvaluateError, evaluate, format_table
from sdpo_core.evaluation.metrics import register_metric
from sdpo_core.evaluation.plots import PLOT_DPI, PLOT_SIZE_IN, GridLayout
from sdpo_core.families import loading
from sdpo_core.families.lora import add_lora
from sdpo_core.families.sd import SDFamily
from sdpo_core.tiny.random_model import TinySizes, build_tiny_pipeline
from sdpo_core.tracking.trackers import NullTracker

PROMPTS = ["a red fox", "a black cat", "a dog"]
STEPS = [1, 2]


@register_metric("test_brightness", "mean pixel value (test only)")
def _brightness(images: torch.Tensor, prompts: list[str], group: torch.Tensor) -> float:
    assert images.shape[0] == len(prompts) == group.shape[0]
    return float(images.mean())


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """(base_dir, trained_dir): a tiny pipeline and a slightly perturbed LoRA on it."""
    root = tmp_path_factory.mktemp("models")
    pipe = build_tiny_pipeline(TinySizes(words=sorted({w for p in PROMPTS for w in p.split()})), seed=0)
    base_dir = root / "base"
    pipe.save_pretrained(base_dir)
    add_lora(pipe.unet, 4, None, ["to_q", "to_k", "to_v", "to_out.0"])
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in pipe.unet.named_parameters():
            if "lora_" in name:  # lora_B starts at zero: without this the LoRA is a no-op
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
    trained_dir = loading.save_trained(SDFamily(pipe), pipe.unet, root / "trained", "lora", base=str(base_dir))
    return base_dir, trained_dir


def _cfg(base_dir, metrics=()):
    return validate_dict(
        {
            "pipeline": "eval-test",
            "model": {"pretrained": str(base_dir)},
            "reward": {"name": "jpeg_compressibility"},
            "evaluate": {
                "steps": STEPS,
                "num_prompts": 3,
                "samples_per_prompt": 2,
                "batch_size": 4,
                "seed": 7,
                "metrics": list(metrics),
            },
        },
        "test",
    )


def _check_model_entry(entry: dict, n: int) -> None:
    assert isinstance(entry["mean"], float) and isinstance(entry["n"], int) and entry["n"] == n
    lo, hi = entry["ci95"]
    assert isinstance(lo, float) and isinstance(hi, float)
    assert len(entry["rewards"]) == n
    # the interval is the t-interval of these very rewards: mean +- t_{0.975, n-1} * s / sqrt(n)
    r = torch.tensor(entry["rewards"], dtype=torch.float64)
    half = float(stats.t.ppf(0.975, n - 1)) * float(r.std()) / math.sqrt(n)
    assert math.isclose(hi - entry["mean"], half, rel_tol=1e-6) and math.isclose(entry["mean"] - lo, half, rel_tol=1e-6)
    assert math.isclose(entry["mean"], sum(entry["rewards"]) / n, rel_tol=1e-9, abs_tol=1e-12)


def test_evaluate_base_and_trained(model_dirs, tmp_path):
    base_dir, trained_dir = model_dirs
    cfg = _cfg(base_dir, metrics=["test_brightness"])
    tracker = NullTracker()
    result = evaluate(cfg, str(base_dir), str(trained_dir), PROMPTS, tmp_path / "a", tracker=tracker)

    on_disk = json.loads((tmp_path / "a" / "eval.json").read_text())
    assert on_disk == result
    assert on_disk["pipeline"] == "eval-test" and on_disk["reward"] == "jpeg_compressibility"
    assert sorted(on_disk["steps"]) == ["1", "2"]
    for entry in on_disk["steps"].values():
        for label in ("base", "trained"):
            _check_model_entry(entry[label], n=6)
            assert set(entry[label]["metrics"]) == {"test_brightness"}
        assert isinstance(entry["gain"], float) and isinstance(entry["win_rate"], float)
        diffs = [t - b for b, t in zip(entry["base"]["rewards"], entry["trained"]["rewards"], strict=True)]
        assert math.isclose(entry["gain"], sum(diffs) / 6, abs_tol=1e-9)
        d = torch.tensor(diffs, dtype=torch.float64)
        half = float(stats.t.ppf(0.975, 5)) * float(d.std()) / math.sqrt(6)
        lo, hi = entry["gain_ci95"]
        assert math.isclose(hi - lo, 2 * half, rel_tol=1e-6) and math.isclose(lo + hi, 2 * entry["gain"], abs_tol=1e-9)
        assert entry["win_rate"] == (sum(x > 0 for x in diffs) + 0.5 * sum(x == 0 for x in diffs)) / 6
    # the LoRA does change the images (else every comparison below is vacuous)
    assert any(e["base"]["rewards"] != e["trained"]["rewards"] for e in on_disk["steps"].values())

    with Image.open(tmp_path / "a" / "reward_vs_steps.png") as im:
        assert im.format == "PNG"
        assert im.size == (round(PLOT_SIZE_IN[0] * PLOT_DPI), round(PLOT_SIZE_IN[1] * PLOT_DPI))
    with Image.open(tmp_path / "a" / "grid.png") as im:
        assert im.format == "PNG"
        # 2 panels (base, trained) x 2 step counts x 3 prompts; 32 px images upscaled to 96 px cells
        assert im.size == GridLayout.for_images(2, len(STEPS), 3, 32).size
        assert im.width >= 3 * 96 and im.height >= 2 * len(STEPS) * 96

    assert [step for step, _ in tracker.metrics] == STEPS
    assert {"eval/base_mean", "eval/trained_mean", "eval/gain", "eval/win_rate"} <= set(tracker.metrics[0][1])
    assert [p.rsplit("/", 1)[-1] for p in tracker.artifacts] == [
        "eval.json",
        "reward_vs_steps.png",
        "grid.png",
    ]
    table = format_table(result)
    assert "win rate" in table and len(table.splitlines()) == 3 + len(STEPS)

    again = evaluate(cfg, str(base_dir), str(trained_dir), PROMPTS, tmp_path / "b")
    assert again["steps"] == result["steps"]  # fixed seeds: identical numbers


def test_evaluate_base_only_cycles_prompts(model_dirs, tmp_path):
    base_dir, _ = model_dirs
    cfg = _cfg(base_dir)
    result = evaluate(cfg, str(base_dir), None, PROMPTS[:2], tmp_path)
    for entry in result["steps"].values():
        assert set(entry) == {"base"}
        _check_model_entry(entry["base"], n=6)
        assert entry["base"]["metrics"] == {}
    assert result["prompts"] == [PROMPTS[0], PROMPTS[1], PROMPTS[0]]  # cycled to num_prompts
    assert "-" in format_table(result)
    with Image.open(tmp_path / "grid.png") as im:
        assert im.size == GridLayout.for_images(1, len(STEPS), 2, 32).size


def test_evaluate_without_eval_prompts_is_an_error(model_dirs, tmp_path):
    base_dir, _ = model_dirs
    with pytest.raises(EvaluateError, match="prompts.eval_fraction"):
        evaluate(_cfg(base_dir), str(base_dir), None, [], tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("last_step,eta", [("clamp", 0.7), ("clamp", 1.0)])
def test_evaluation_samples_exactly_as_training(tiny_cfg, tmp_path, last_step, eta):
    # the trainer's policy (sampling.build_policy inside Trainer) and evaluation's (generate.policy_for
    # on a freshly loaded pipeline) give the same trajectory from the same seed: same timesteps, last
    # step, eta and denoiser call. diffusers' pipe() (final_alpha, its own noise order) would not.
    from sdpo_core.generate import generate_trajectories, policy_for
    from sdpo_core.training.trainer import Trainer

    cfg = tiny_cfg(f"sample.last_step={last_step}", f"sample.eta={eta}", "sample.num_steps=3")
    tr = Trainer(cfg, tmp_path / "run")  # fresh LoRA: lora_B is zero, so the policy is the base model's
    prompts, seeds = ["a red fox", "a dog"], [11, 12]
    trained_side = generate_trajectories(tr.family, tr.policy, prompts, seeds, cfg.sample.resolution)
    family = loading.load_family(cfg.model.pretrained)
    eval_side = generate_trajectories(family, policy_for(family, 3, cfg.sample, cfg.model), prompts, seeds,
                                      cfg.sample.resolution)
    for name in ("latents", "x0", "log_probs"):
        assert torch.equal(getattr(trained_side, name), getattr(eval_side, name)), name
    # and the policy is the one training samples its batches with
    assert tr.policy.sampler is tr.sampler and torch.equal(tr.policy.timesteps, tr.timesteps)
    # the images evaluated are the last step's predicted x0, under the stochastic clamp step
    diffusers = family.pipe(prompts, num_inference_steps=3, eta=eta, output_type="latent",
                     generator=[torch.Generator().manual_seed(x) for x in seeds]).images
    assert not torch.allclose(diffusers, eval_side.x0[:, -1])
