"""Shared parts of the model-based rewards: CLIP-style preprocessing in torch, locating and
loading published weights, the MLP preference head, and batched scoring.

Every model-based reward here takes images in [0, 1] of shape (N, 3, H, W), any H and W, and
preprocesses them the way the published models were trained and evaluated (CLIP's eval
transform: bicubic resize of the short side to 224, center crop 224, CLIP mean/std), in torch
so images never leave the device.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from sdpo_core.rewards import RewardError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def resize_center_crop(images: torch.Tensor, size: int = 224) -> torch.Tensor:
    """(N, 3, H, W) -> (N, 3, size, size): bicubic resize of the short side to ``size``, then a
    center crop, with torchvision's ``Resize(size)`` + ``CenterCrop(size)`` arithmetic.

    ``antialias=True`` makes torch use PIL's bicubic kernel (a = -0.5, widened when shrinking),
    which is what the published models saw; the clamp mirrors PIL writing uint8 pixels.
    """
    h, w = images.shape[-2:]
    short, long = (h, w) if h <= w else (w, h)
    new_long = int(size * long / short)  # torchvision truncates the long side
    new_h, new_w = (size, new_long) if h <= w else (new_long, size)
    x = images.float()
    if (new_h, new_w) != (h, w):
        x = F.interpolate(x, size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=True)
    top = int(round((new_h - size) / 2.0))
    left = int(round((new_w - size) / 2.0))
    return x[..., top : top + size, left : left + size].clamp(0.0, 1.0)


def normalize(
    images: torch.Tensor, mean: tuple[float, ...] = CLIP_MEAN, std: tuple[float, ...] = CLIP_STD
) -> torch.Tensor:
    """(N, 3, H, W) in [0, 1] -> (N, 3, H, W) per-channel ``(x - mean) / std``."""
    m = torch.tensor(mean, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    return (images - m) / s


def clip_preprocess(images: torch.Tensor, size: int = 224) -> torch.Tensor:
    """(N, 3, H, W) in [0, 1], any H, W -> (N, 3, size, size) float32 CLIP-normalised pixels."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise RewardError(f"expected images of shape (N, 3, H, W), got {tuple(images.shape)}")
    return normalize(resize_center_crop(images, size))


def check_source(reward: str, path: str | None, how_to_get: str) -> str:
    """Return ``path`` if it is an existing local path or looks like a hub id, else RewardError."""
    if not path:
        raise RewardError(
            f"reward '{reward}' needs its weights: set reward.options.path to a local directory or a "
            f"hub id (e.g. --set reward.options.path=/models/{reward}). {how_to_get}"
        )
    local = Path(path).expanduser()
    if local.exists():
        return str(local)
    if _HUB_ID.fullmatch(path) and not path.startswith((".", "~")):
        return path
    raise RewardError(f"reward '{reward}': weights not found at '{path}'. {how_to_get}")


def load_pretrained(reward: str, cls: Any, path: str, how_to_get: str, **kwargs: Any) -> Any:
    """``cls.from_pretrained(path, **kwargs)`` with a RewardError naming the path on failure.

    For models, weights the checkpoint lacks are an error: transformers would fill them with
    random values and only warn, and a reward with random parts is silently wrong.
    """
    is_model = hasattr(cls, "base_model_prefix")
    where = f"'{path}'" + (f" (subfolder '{kwargs['subfolder']}')" if kwargs.get("subfolder") else "")
    try:
        out = (
            cls.from_pretrained(path, output_loading_info=True, **kwargs)
            if is_model
            else cls.from_pretrained(path, **kwargs)
        )
    except (OSError, ValueError, RuntimeError) as exc:
        raise RewardError(
            f"reward '{reward}': cannot load {cls.__name__} from {where}: {exc}. {how_to_get}"
        ) from exc
    if not is_model:
        return out
    model, info = out
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise RewardError(
            f"reward '{reward}': {where} lacks {len(missing)} weights of {cls.__name__} (e.g. {missing[:4]}); "
            f"is it the right model? {how_to_get}"
        )
    return model


def resolve_file(reward: str, path: str, filename: str, how_to_get: str) -> Path:
    """The file ``filename`` inside local dir ``path`` (or ``path`` itself if it is a file) or a hub repo."""
    local = Path(path).expanduser()
    if local.is_file():
        return local
    if local.is_dir():
        if not (local / filename).is_file():
            raise RewardError(f"reward '{reward}': '{local / filename}' not found. {how_to_get}")
        return local / filename
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(path, filename))
    except Exception as exc:  # hub errors have many types (offline, 404, auth); all mean "not there"
        raise RewardError(
            f"reward '{reward}': cannot get '{filename}' from '{path}': {exc}. {how_to_get}"
        ) from exc


class PreferenceHead(nn.Module):
    """The MLP head of the LAION aesthetic predictor, reused by ImageReward:
    Linear(D, 1024) - Dropout(0.2) - Linear(1024, 128) - Dropout(0.2) - Linear(128, 64) -
    Dropout(0.1) - Linear(64, 16) - Linear(16, 1), no activations (as published).
    Parameter names ``layers.{0,2,4,6,7}.*`` match the published state dicts.
    """

    def __init__(self, in_dim: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(in_dim, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, D) -> (N,)."""
        return self.layers(x).squeeze(-1)


def check_batch_size(reward: str, batch_size: Any) -> int:
    """The ``batch_size`` option as a positive int, else RewardError."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise RewardError(f"reward '{reward}': batch_size must be a positive integer, got {batch_size!r}")
    return batch_size


def head_from_state_dict(reward: str, state: dict[str, torch.Tensor], source: str) -> PreferenceHead:
    """Build a :class:`PreferenceHead` whose input size is read from ``layers.0.weight``."""
    if "layers.0.weight" not in state:
        raise RewardError(f"reward '{reward}': '{source}' has no 'layers.0.weight'; is it the MLP head?")
    head = PreferenceHead(state["layers.0.weight"].shape[1])
    try:
        head.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise RewardError(
            f"reward '{reward}': '{source}' does not fit the published MLP head: {exc}"
        ) from exc
    return head.eval()


def score_in_batches(
    score_fn: Callable[[torch.Tensor, list[str]], torch.Tensor],
    images: torch.Tensor,
    prompts: list[str],
    batch_size: int,
) -> torch.Tensor:
    """Run ``score_fn`` on chunks of ``batch_size`` under no_grad.

    images: (N, 3, H, W); prompts: N strings. Returns (N,) float32 on the CPU.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise RewardError(f"expected images of shape (N, 3, H, W), got {tuple(images.shape)}")
    if len(prompts) != images.shape[0]:
        raise RewardError(f"got {images.shape[0]} images but {len(prompts)} prompts")
    out = []
    with torch.no_grad():
        for i in range(0, images.shape[0], batch_size):
            out.append(score_fn(images[i : i + batch_size], list(prompts[i : i + batch_size])).float().cpu())
    return torch.cat(out) if out else torch.zeros(0)


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt")


def load_tokenizer(reward: str, path: str, tokenizer_path: str | None, hint: str) -> Any:
    """AutoTokenizer from ``tokenizer_path`` (or ``path``), with a RewardError that says which option to set.

    transformers 5 builds an empty tokenizer from a bare model directory instead of failing,
    which would tokenize every prompt to unknown tokens; both that and a missing one are errors.
    """
    from transformers import AutoTokenizer

    source = tokenizer_path or path
    fix = f"set reward.options.tokenizer_path ({hint})"
    local = Path(source).expanduser()
    if local.is_dir() and not any((local / f).is_file() for f in _TOKENIZER_FILES):
        raise RewardError(f"reward '{reward}': no tokenizer files in '{local}'; {fix}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(local) if local.is_dir() else source)
    except (OSError, ValueError, TypeError) as exc:
        raise RewardError(f"reward '{reward}': no tokenizer at '{source}' ({exc}); {fix}") from exc
    if len(tokenizer) < 8:
        raise RewardError(f"reward '{reward}': the tokenizer at '{source}' has an empty vocabulary; {fix}")
    return tokenizer


class CLIPPairScorer:
    """Image-text agreement of a transformers ``CLIPModel``: ``scale * cos(image_emb, text_emb)``.

    ``use_logit_scale``: scale = ``logit_scale.exp()`` (PickScore) or 1 (HPSv2's raw cosine).
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        device: torch.device,
        dtype: torch.dtype,
        batch_size: int,
        use_logit_scale: bool,
    ) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.device, self.dtype, self.batch_size = device, dtype, batch_size
        self.use_logit_scale = use_logit_scale
        self.max_length = min(77, model.config.text_config.max_position_embeddings)

    def _score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """(n, 3, H, W), n prompts -> (n,)."""
        m = self.model
        pixels = clip_preprocess(images.to(self.device)).to(self.dtype)
        tokens = self.tokenizer(
            prompts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.device)
        # The sub-modules, not get_*_features: those changed return type between transformers 4 and 5.
        img = m.visual_projection(m.vision_model(pixel_values=pixels).pooler_output).float()
        txt = m.text_projection(
            m.text_model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).pooler_output
        ).float()
        cos = (img / img.norm(dim=-1, keepdim=True) * txt / txt.norm(dim=-1, keepdim=True)).sum(-1)
        return m.logit_scale.float().exp() * cos if self.use_logit_scale else cos

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """(N, 3, H, W) in [0, 1], N prompts -> (N,) float32."""
        return score_in_batches(self._score, images, prompts, self.batch_size)


def build_clip_pair_scorer(
    reward: str,
    path: str | None,
    tokenizer_path: str | None,
    device: torch.device | str,
    dtype: torch.dtype,
    batch_size: int,
    use_logit_scale: bool,
    how_to_get: str,
    tokenizer_hint: str,
) -> CLIPPairScorer:
    """Load a ``CLIPModel`` and its tokenizer from ``path`` into a :class:`CLIPPairScorer`."""
    from transformers import CLIPModel

    batch_size = check_batch_size(reward, batch_size)
    path = check_source(reward, path, how_to_get)
    model = load_pretrained(reward, CLIPModel, path, how_to_get, dtype=dtype)
    tokenizer = load_tokenizer(reward, path, tokenizer_path, tokenizer_hint)
    device = torch.device(device)
    return CLIPPairScorer(model.to(device).eval(), tokenizer, device, dtype, batch_size, use_logit_scale)
