"""``combine``: a weighted sum of other rewards.

    reward:
      name: combine
      options:
        components:
          - {name: aesthetic, weight: 1.0, options: {path: /models/aesthetic}}
          - {name: pickscore, weight: 0.5, options: {path: /models/pickscore}}
        normalize: false

score = sum_i weight_i * r_i(images, prompts), each r_i built with ``build_reward`` and checked
with ``check_rewards``. With ``normalize: true`` each r_i is first z-scored over the batch it
came in, ``(r_i - mean) / (std + 1e-6)`` (population std): the components then enter on equal
scales whatever their units, at the cost of depending on the rest of the batch (a batch of one
gives 0 for every component). The raw, unnormalised r_i of the last call are kept in
``last_components`` (name -> (N,) float32) so the trainer can log each one.
"""

from __future__ import annotations

from typing import Any

import torch

from sdpo_core.rewards import RewardError, RewardFn, build_reward, check_rewards

_COMPONENT_KEYS = {"name", "weight", "options"}


class CombinedReward:
    """Call with (N, 3, H, W) in [0, 1] and N prompts -> (N,) float32 weighted sum."""

    def __init__(self, components: list[tuple[str, float, RewardFn]], normalize: bool) -> None:
        self.components = components
        self.normalize = normalize
        self.last_components: dict[str, torch.Tensor] = {}

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        n = images.shape[0]
        total = torch.zeros(n, dtype=torch.float32)
        last = {}
        for key, weight, fn in self.components:
            values = check_rewards(key, fn(images, prompts), n).detach().float().cpu()
            last[key] = values
            if self.normalize:
                values = (values - values.mean()) / (values.std(unbiased=False) + 1e-6)
            total = total + weight * values
        self.last_components = last
        return total


def _parse_component(i: int, spec: Any) -> tuple[str, float, dict[str, Any]]:
    where = f"reward 'combine': components[{i}]"
    if not isinstance(spec, dict):
        raise RewardError(f"{where} must be a mapping {{name, weight, options}}, got {spec!r}")
    unknown = set(spec) - _COMPONENT_KEYS
    if unknown:
        raise RewardError(f"{where} has unknown keys {sorted(unknown)}; allowed: {sorted(_COMPONENT_KEYS)}")
    name, weight, options = spec.get("name"), spec.get("weight", 1.0), spec.get("options") or {}
    if not isinstance(name, str) or not name:
        raise RewardError(f"{where} needs a 'name' (a registered reward or module:function)")
    if name == "combine":
        raise RewardError(
            f"{where}: a combination cannot contain 'combine'; list its components here instead"
        )
    if isinstance(weight, bool) or not isinstance(weight, int | float):
        raise RewardError(f"{where} ('{name}'): weight must be a number, got {weight!r}")
    if not isinstance(options, dict):
        raise RewardError(f"{where} ('{name}'): options must be a mapping, got {options!r}")
    return name, float(weight), options


def build(
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    components: list[dict[str, Any]] | None = None,
    normalize: bool = False,
    model_dir: str | None = None,
) -> CombinedReward:
    """Build every component with ``build_reward`` (each given ``model_dir``, the base model
    directory); names repeated get ``#2``, ``#3`` keys."""
    if not components or not isinstance(components, list):
        raise RewardError(
            "reward 'combine' needs options.components: a non-empty list of {name, weight, options}"
        )
    if not isinstance(normalize, bool):
        raise RewardError(f"reward 'combine': normalize must be true or false, got {normalize!r}")
    built: list[tuple[str, float, RewardFn]] = []
    seen: dict[str, int] = {}
    for i, spec in enumerate(components):
        name, weight, options = _parse_component(i, spec)
        seen[name] = seen.get(name, 0) + 1
        key = name if seen[name] == 1 else f"{name}#{seen[name]}"
        built.append((key, weight, build_reward(name, options, device, dtype, model_dir)))
    return CombinedReward(built, normalize)
