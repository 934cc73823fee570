"""The digits-tiny world: real handwritten digits, prompts that name them, a classifier, rewards.

Data are scikit-learn's 1,797 real 8x8 digits (shipped inside the package, no download),
upsampled to 32x32 RGB in [0, 1] (ink bright, three identical channels). A fixed-seed split
gives 70% to the diffusion model (``"diffusion"``) and 30% held out (``"heldout"``), which only
the classifier sees: 80% of it trains the classifier, 20% measures it.

Importing this module registers the rewards ``digit_alignment`` and ``digit_alignment_bold``;
the evaluation metrics that read the same classifier (``digit_accuracy``, ``boldness``) live in
:mod:`sdpo_core.evaluation.metrics`. The tiny model builders (:mod:`sdpo_core.tiny`) take their
data and classifier from here.

``digit_alignment_bold`` is the one to train digits-tiny on: the base model already scores
~0.97 on ``digit_alignment`` at every step count (no room to grow), but ~0.78 on the bold one.

Usage::

    from sdpo_core.rewards import build_reward
    reward = build_reward("digit_alignment", model_dir="runs/digits-tiny/base")  # its classifier/
    scores = reward(images, ["a handwritten digit 7"] * len(images))  # (N,) in [0, 1]

The classifier lives in the base model directory (``MODEL_DIR/classifier``, written by ``sdpo base``
for ``model.build: digits-tiny``); the rewards and ``digit_accuracy`` take that directory as
``model_dir`` (the trainer and evaluation pass ``model.pretrained``), or an explicit
``classifier_path`` option. Neither depends on the working directory beyond ``model.pretrained``
itself.
"""

from __future__ import annotations

import json
import re
from functools import cache, lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from sdpo_core.rewards.registry import RewardError, register_reward

IMAGE_SIZE = 32
SPLIT_SEED = 1234
CLASSIFIER_SEED = 0
DIFFUSION_FRACTION = 0.7
CLASSIFIER_TRAIN_FRACTION = 0.8
CLASSIFIER_SUBDIR = "classifier"  # inside the base model directory, beside model_index.json
DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
# {n} numeral, {w} word, {a} its article; numerals and words both appear so the text encoder
# learns that "7" and "seven" mean the same image.
TEMPLATES = [
    "a handwritten digit {n}",
    "the number {w}",
    "{a} {w}",
    "digit {w}",
    "a drawing of the number {n}",
    "the digit {n}",
    "a handwritten {w}",
    "number {n}",
    "a sketch of the digit {w}",
    "the numeral {n}",
    "{a} {w} written by hand",
    "a picture of the number {w}",
]


# ----------------------------------------------------------------------------- data
@cache
def _all_digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits  # local: sklearn is slow to import

    data = load_digits()
    small = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (1797, 1, 8, 8)
    big = F.interpolate(small, size=IMAGE_SIZE, mode="bilinear", align_corners=False).clamp(0, 1)
    return big.expand(-1, 3, -1, -1).contiguous(), torch.tensor(data.target, dtype=torch.long)


def load_digit_images(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Real digits of ``split``: ``"diffusion"`` (70%), ``"heldout"`` (30%), or its
    ``"classifier_train"`` (80%) / ``"classifier_test"`` (20%) parts.

    Returns images (N, 3, 32, 32) float32 in [0, 1] and labels (N,) long.
    """
    images, labels = _all_digits()
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(SPLIT_SEED))
    n_diff = round(DIFFUSION_FRACTION * len(labels))
    held = order[n_diff:]
    n_cls = round(CLASSIFIER_TRAIN_FRACTION * len(held))
    parts = {
        "diffusion": order[:n_diff],
        "heldout": held,
        "classifier_train": held[:n_cls],
        "classifier_test": held[n_cls:],
    }
    if split not in parts:
        raise ValueError(f"unknown digits split {split!r}; choose one of {', '.join(parts)}")
    idx = parts[split]
    return images[idx], labels[idx]


# -------------------------------------------------------------------------- prompts
class DigitPromptError(ValueError):
    """A prompt names no digit, or more than one, so no digit reward can be computed."""


def digit_prompts(digit: int) -> list[str]:
    """The 12 phrasings of ``digit`` (0-9) used to train and prompt digits-tiny."""
    if digit not in range(10):
        raise ValueError(f"digit must be 0-9, got {digit!r}")
    word = DIGIT_WORDS[digit]
    article = "an" if word[0] in "aeiou" else "a"
    return [t.format(n=digit, w=word, a=article) for t in TEMPLATES]


def all_digit_prompts() -> list[tuple[str, int]]:
    """Every (prompt, digit) pair: 10 digits x 12 phrasings."""
    return [(p, d) for d in range(10) for p in digit_prompts(d)]


def digit_vocabulary() -> list[str]:
    """Every word of every phrasing (for the tokenizer: each becomes one token)."""
    return sorted({w for p, _ in all_digit_prompts() for w in p.split()} | set(DIGIT_WORDS))


def parse_digit(prompt: str) -> int:
    """The digit a prompt names, as a numeral ("7") or a word ("seven"); DigitPromptError if none
    or several different ones."""
    found = set()
    for token in re.findall(r"[a-z]+|\d+", prompt.lower()):
        if token in DIGIT_WORDS:
            found.add(DIGIT_WORDS.index(token))
        elif token.isdigit():
            if len(token) > 1:
                raise DigitPromptError(f"prompt {prompt!r} names the number {token}, not a single digit 0-9")
            found.add(int(token))
    if len(found) != 1:
        what = "no digit" if not found else f"several digits {sorted(found)}"
        raise DigitPromptError(
            f"cannot read the digit from prompt {prompt!r}: it names {what}; a digits prompt names "
            "exactly one digit as a numeral or a word, e.g. 'a handwritten digit 7' or 'the number seven'"
        )
    return found.pop()


# ----------------------------------------------------------------------- classifier
class DigitClassifier(nn.Module):
    """A small CNN on 8x8 pooled images: (N, 1, 8, 8) in [0, 1] -> (N, 10) logits (~60k params)."""

    def __init__(self, width: int = 32, hidden: int = 40):
        super().__init__()
        self.width, self.hidden = width, hidden
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.fc1 = nn.Linear(2 * width * 16, hidden)
        self.fc2 = nn.Linear(hidden, 10)
        self.drop = nn.Dropout(0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.max_pool2d(F.relu(self.conv2(F.relu(self.conv1(x)))), 2)  # (N, 2w, 4, 4)
        return self.fc2(self.drop(F.relu(self.fc1(h.flatten(1)))))


def classifier_input(images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) images in [0, 1] -> (N, 1, 8, 8) grey, average-pooled to the data's native
    resolution (pooling removes the texture a VAE adds but keeps the stroke shape)."""
    return F.adaptive_avg_pool2d(images.float().mean(dim=1, keepdim=True), 8)


def load_classifier(path: str | Path) -> tuple[DigitClassifier, dict]:
    """Load a classifier saved by :func:`save_classifier`; returns (model in eval mode, config)."""
    path = Path(path)
    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    model = DigitClassifier(config["width"], config["hidden"])
    model.load_state_dict(load_file(path / "model.safetensors"))
    return model.eval().requires_grad_(False), config


def classifier_path_for(model_dir: str | Path | None, classifier_path: str | Path | None, who: str) -> Path:
    """Where ``who`` finds its classifier: ``classifier_path`` if given, else ``MODEL_DIR/classifier``;
    a RewardError saying what to set when neither is known or nothing is there."""
    if classifier_path is not None:
        path = Path(classifier_path)
    elif model_dir is not None:
        path = Path(model_dir) / CLASSIFIER_SUBDIR
    else:
        raise RewardError(
            f"{who} needs the base model directory (model_dir, i.e. model.pretrained) holding "
            f"{CLASSIFIER_SUBDIR}/, or reward.options.classifier_path"
        )
    if not (path / "model.safetensors").is_file():
        raise RewardError(
            f"{who}: no digits classifier in {path} (`sdpo base` writes it into the base model directory "
            "for model.build: digits-tiny; or point reward.options.classifier_path at one)"
        )
    return path


@lru_cache(maxsize=8)
def _cached_classifier(path: str) -> DigitClassifier:
    return load_classifier(path)[0]


def get_classifier(path: str | Path) -> DigitClassifier:
    """The classifier saved at ``path``, loaded once per process."""
    return _cached_classifier(str(Path(path).resolve()))


# -------------------------------------------------------------------------- rewards
def digit_probability(model: DigitClassifier, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """(N, 3, H, W) images in [0, 1] and N prompts -> (N,) float32 probability of each prompt's digit."""
    if len(prompts) != images.shape[0]:
        raise RewardError(f"digit reward got {images.shape[0]} images but {len(prompts)} prompts")
    digits = torch.tensor([parse_digit(p) for p in prompts], device=images.device)
    device = next(model.parameters()).device
    with torch.no_grad():
        probs = model(classifier_input(images.to(device))).float().softmax(dim=1)
    return probs.gather(1, digits.to(device)[:, None]).squeeze(1).to(images.device)


def stroke_boldness(images: torch.Tensor, target_area: float = 0.45) -> torch.Tensor:
    """(N, 3, H, W) in [0, 1] -> (N,) in [0, 1]: the fraction of pixels whose grey value exceeds
    0.5 (the stroke area), over ``target_area``, capped at 1.

    Real digits cover 0.30 (boldness 0.67) and the base model draws 0.32-0.36; strokes about
    one pixel wider (at 32 px) reach 0.45 while the classifier still reads them (p ~0.99). A
    faint haze below 0.5 does not count, so only brighter, wider strokes raise it.
    """
    area = (images.detach().float().mean(dim=1) > 0.5).flatten(1).float().mean(dim=1)
    return (area / target_area).clamp(0, 1)


def _reject_options(name: str, opts: dict) -> None:
    if opts:
        raise RewardError(
            f"reward '{name}' takes no option(s) {sorted(opts)}; remove them from reward.options"
        )


@register_reward(
    "digit_alignment",
    "probability the digits classifier gives to the digit the prompt names (prompt must name one digit)",
    "[0, 1]",
)
def digit_alignment(
    device=None, dtype=None, model_dir: str | None = None, classifier_path: str | None = None, **opts
):
    _reject_options("digit_alignment", opts)
    path = classifier_path_for(model_dir, classifier_path, "reward 'digit_alignment'")
    model = get_classifier(path).to(device or "cpu")
    return lambda images, prompts: digit_probability(model, images, prompts)


@register_reward(
    "digit_alignment_bold",
    "digit_alignment x (1 - weight + weight x boldness), boldness = min(1, fraction of pixels brighter "
    "than 0.5 / target_area): the prompted digit, drawn with bold strokes (defaults weight 1, target_area "
    "0.45; real digits score ~0.66, a bolder real digit ~0.99)",
    "[0, 1]",
)
def digit_alignment_bold(
    device=None,
    dtype=None,
    model_dir: str | None = None,
    classifier_path: str | None = None,
    weight: float = 1.0,
    target_area: float = 0.45,
    **opts,
):
    _reject_options("digit_alignment_bold", opts)
    if not 0 <= weight <= 1 or not 0 < target_area <= 1:
        raise RewardError(
            f"digit_alignment_bold: need 0 <= weight <= 1 and 0 < target_area <= 1, "
            f"got weight={weight}, target_area={target_area}"
        )
    model = get_classifier(classifier_path_for(model_dir, classifier_path, "reward 'digit_alignment_bold'"))
    model = model.to(device or "cpu")

    def reward(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        # the digit probability stays a factor: a bold blob that is no digit scores ~0
        bold = stroke_boldness(images, target_area).to(images.device)
        return digit_probability(model, images, prompts) * (1 - weight + weight * bold)

    return reward
