"""Registry, JPEG rewards, ``module:function`` rewards and weighted combinations."""

from __future__ import annotations

import subprocess
import sys
import uuid

import pytest
import torch

from sdpo_core.rewards import RewardError, available_rewards, build_reward, validate_reward_name

PROMPTS = ["a", "b", "c", "d"]
NOT_CALLABLE = 3


def brightness(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """(N, 3, H, W) -> (N,) mean pixel value."""
    return images.float().mean(dim=(1, 2, 3))


def prompt_length(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """(N,) number of characters in each prompt."""
    return torch.tensor([float(len(p)) for p in prompts])


def scaled_brightness(scale: float = 1.0):
    """A factory: options of a module:function reward are its keyword arguments."""
    return lambda images, prompts: scale * brightness(images, prompts)


def _flat_and_noisy() -> torch.Tensor:
    flat = torch.full((1, 3, 64, 64), 0.5)
    noisy = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    return torch.cat([flat, noisy])


# ------------------------------------------------------------------ registry


def test_every_documented_reward_is_registered():
    names = set(available_rewards())
    want = {
        "jpeg_compressibility",
        "jpeg_incompressibility",
        "aesthetic",
        "pickscore",
        "hpsv2",
        "imagereward",
        "combine",
        "remote",
    }
    assert want <= names
    for spec in available_rewards().values():
        assert spec.description and spec.value_range


def test_importing_the_registry_stays_light():
    """Model-based rewards import transformers (and their own modules) only when built."""
    lazy = [
        "transformers",
        "sdpo_core.rewards.clip_common",
        "sdpo_core.rewards.remote",
        "sdpo_core.rewards.combine",
    ]
    code = f"import sys, sdpo_core.rewards as r; r.available_rewards(); print([m for m in {lazy} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_unknown_name_suggests_a_close_one():
    with pytest.raises(RewardError, match="did you mean 'aesthetic'"):
        validate_reward_name("aesthetics")


def test_bad_options_list_the_accepted_ones():
    with pytest.raises(RewardError, match=r"jpeg_compressibility.*qualty.*accepted: \['quality'\]"):
        build_reward("jpeg_compressibility", {"qualty": 90})


# ------------------------------------------------------------------ JPEG


def test_jpeg_rewards_order_flat_and_noisy_images():
    images = _flat_and_noisy()
    comp = build_reward("jpeg_compressibility")(images, ["x", "y"])
    incomp = build_reward("jpeg_incompressibility")(images, ["x", "y"])
    assert comp.shape == incomp.shape == (2,) and comp.dtype == incomp.dtype == torch.float32
    assert comp[0] > comp[1], "a flat image compresses better than noise"
    assert incomp[1] > incomp[0]
    torch.testing.assert_close(comp, -incomp)
    assert (comp <= 0).all()


def test_jpeg_quality_option_changes_size():
    noisy = _flat_and_noisy()[1:]
    low = build_reward("jpeg_incompressibility", {"quality": 30})(noisy, ["x"])
    high = build_reward("jpeg_incompressibility", {"quality": 95})(noisy, ["x"])
    assert low < high


# ------------------------------------------------------------------ module:function


def test_module_function_is_used_as_is():
    fn = build_reward(f"{__name__}:brightness")
    assert fn is brightness
    torch.testing.assert_close(fn(_flat_and_noisy(), ["x", "y"])[0], torch.tensor(0.5))


def test_module_function_with_options_is_a_factory():
    fn = build_reward(f"{__name__}:scaled_brightness", {"scale": 4.0})
    torch.testing.assert_close(fn(torch.full((2, 3, 8, 8), 0.25), ["x", "y"]), torch.ones(2))


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            "no_such_module_xyz:score",
            r"cannot import module 'no_such_module_xyz'.*installed or on PYTHONPATH",
        ),
        (f"{__name__}:brightnes", r"has no attribute 'brightnes'; did you mean 'brightness'"),
        (f"{__name__}:NOT_CALLABLE", r"'NOT_CALLABLE' is a int, not a callable"),
        (f"{__name__}:", r"expected 'module:function'"),
        (":brightness", r"expected 'module:function'"),
    ],
)
def test_bad_module_function_says_what_is_wrong(spec, message):
    with pytest.raises(RewardError, match=message):
        validate_reward_name(spec)


def test_module_that_fails_to_import_reports_its_error(tmp_path, monkeypatch):
    name = f"broken_reward_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text("raise RuntimeError('needs a GPU licence')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("SDPO_ALLOWED_REWARD_MODULES", name)
    with pytest.raises(RewardError, match=r"importing module .* failed: RuntimeError: needs a GPU licence"):
        validate_reward_name(f"{name}:score")


def test_config_load_rejects_a_bad_reward():
    from sdpo_core.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"reward.name.*no_such_module_xyz"):
        load_config("digits-tiny", overrides=["reward.name=no_such_module_xyz:score"])


# ------------------------------------------------------------------ combine


def _combine(normalize: bool = False, **extra):
    components = [
        {"name": f"{__name__}:brightness", "weight": 2.0},
        {"name": f"{__name__}:prompt_length", "weight": -0.5},
    ]
    return build_reward("combine", {"components": components, "normalize": normalize, **extra})


def test_combine_is_the_weighted_sum_and_reports_components():
    reward = _combine()
    images = torch.stack([torch.full((3, 4, 4), v) for v in (0.0, 0.25, 0.5, 1.0)])
    prompts = ["a", "bb", "ccc", "dddd"]
    # 2 * brightness - 0.5 * len: [0 - 0.5, 0.5 - 1, 1 - 1.5, 2 - 2] = [-0.5, -0.5, -0.5, 0]
    torch.testing.assert_close(reward(images, prompts), torch.tensor([-0.5, -0.5, -0.5, 0.0]))
    parts = reward.last_components
    assert list(parts) == [f"{__name__}:brightness", f"{__name__}:prompt_length"]
    torch.testing.assert_close(parts[f"{__name__}:prompt_length"], torch.tensor([1.0, 2.0, 3.0, 4.0]))


def test_combine_normalize_z_scores_each_component_over_the_batch():
    reward = _combine(normalize=True)
    images = torch.stack([torch.full((3, 4, 4), v) for v in (0.0, 0.25, 0.5, 1.0)])
    prompts = ["a", "bb", "ccc", "dddd"]
    got = reward(images, prompts)

    def z(x):
        return (x - x.mean()) / (x.std(unbiased=False) + 1e-6)

    parts = reward.last_components  # raw values, before normalisation
    want = 2.0 * z(parts[f"{__name__}:brightness"]) - 0.5 * z(parts[f"{__name__}:prompt_length"])
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(parts[f"{__name__}:brightness"], torch.tensor([0.0, 0.25, 0.5, 1.0]))


def test_combine_builds_registered_components_with_their_options():
    reward = build_reward(
        "combine",
        {
            "components": [
                {"name": "jpeg_compressibility", "weight": 1.0, "options": {"quality": 50}},
                {"name": "jpeg_compressibility", "weight": 0.0},
            ]
        },
    )
    images = _flat_and_noisy()
    values = reward(images, ["x", "y"])
    assert set(reward.last_components) == {"jpeg_compressibility", "jpeg_compressibility#2"}
    want = build_reward("jpeg_compressibility", {"quality": 50})(images, ["x", "y"])
    torch.testing.assert_close(values, want)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({}, "needs options.components"),
        ({"components": []}, "needs options.components"),
        ({"components": [{"name": "jpeg_compressibility", "wieght": 1}]}, r"unknown keys \['wieght'\]"),
        ({"components": [{"name": "jpeg_compressibility", "weight": "high"}]}, "weight must be a number"),
        ({"components": [{"weight": 1.0}]}, "needs a 'name'"),
        ({"components": [{"name": "combine"}]}, "cannot contain 'combine'"),
        (
            {"components": [{"name": "jpeg_compressibility"}], "normalize": "yes"},
            "normalize must be true or false",
        ),
        ({"components": [{"name": "no_such_reward"}]}, "unknown reward 'no_such_reward'"),
    ],
)
def test_combine_rejects_bad_configs(options, message):
    with pytest.raises(RewardError, match=message):
        build_reward("combine", options)


def test_combine_guards_each_component_by_name():
    reward = build_reward("combine", {"components": [{"name": f"{__name__}:nan_reward"}]})
    with pytest.raises(RewardError, match=rf"reward '{__name__}:nan_reward' returned non-finite"):
        reward(torch.zeros(2, 3, 4, 4), ["x", "y"])


def nan_reward(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    return torch.full((images.shape[0],), float("nan"))
