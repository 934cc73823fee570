"""``remote``: score images with a reward served over HTTP by ``sdpo reward-server``.

    reward: {name: remote, options: {url: "http://127.0.0.1:8000", timeout: 30, retries: 3}}

Useful when the reward model lives on another GPU or machine. The wire format (shared with
:mod:`sdpo_core.rewards.server`), ``POST /score`` with a JSON body::

    {"prompts": [str] * N,
     "images": {"format": "array", "dtype": "float16" | "uint8", "shape": [N, 3, H, W],
                "data": base64 of the little-endian C-order array}      # float16 in [0, 1], uint8 in 0..255
            |  {"format": "png", "data": [base64 PNG] * N}}

answered ``{"scores": [float] * N}`` (200), or ``{"error": message}`` with 400 (bad payload),
401 (missing or wrong token), 404, 411, 413 (over the server's limits), 500 (the reward failed)
or 503 (busy). ``GET /health`` answers ``{"status": "ok", "reward": name}``.

Options: ``url``; ``timeout`` (seconds per socket operation); ``retries`` (extra attempts after the
first, on connection errors, timeouts and 502/503/504, waiting ``backoff * 2**k`` seconds
between them; 400, 401, 413 and 500 are final); ``encoding`` (``float16``: what the local reward
would see up to fp16 rounding; ``uint8`` / ``png``: half the bytes, what a saved image holds);
``token_env`` (default ``SDPO_REWARD_TOKEN``): the environment variable whose value is sent as
``Authorization: Bearer``, when set. The option names a variable, never the token itself, since
options are recorded with the run (config.yaml, MLflow params, the DVC params file).
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import time
import urllib.error
import urllib.request
from typing import Any

import numpy as np
import torch
from PIL import Image

from sdpo_core.rewards import RewardError

ENCODINGS = ("float16", "uint8", "png")
_ARRAY_DTYPES: dict[str, np.dtype] = {"float16": np.dtype("<f2"), "uint8": np.dtype("u1")}
_RETRY_STATUS = {502, 503, 504}
TOKEN_ENV = "SDPO_REWARD_TOKEN"
# Why a final answer cannot be helped by retrying, and what to do instead.
_FINAL_HINTS = {
    401: "not retried: set {env} here to the server's {server_env}",
    413: "not retried: the request is over the server's limits; send fewer or smaller images per call "
    "or raise the server's --max-* options",
}


class PayloadError(ValueError):
    """A /score request body that does not follow the wire format (the server answers 400)."""


def encode_images(images: torch.Tensor, encoding: str) -> dict[str, Any]:
    """(N, 3, H, W) in [0, 1] -> the JSON ``images`` object of the wire format."""
    x = images.detach().float().clamp(0, 1).cpu()
    if encoding == "png":
        data = []
        for arr in (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy():
            buf = io.BytesIO()
            Image.fromarray(arr).save(buf, format="PNG")
            data.append(base64.b64encode(buf.getvalue()).decode("ascii"))
        return {"format": "png", "data": data}
    if encoding not in _ARRAY_DTYPES:
        raise RewardError(f"reward 'remote': encoding must be one of {ENCODINGS}, got {encoding!r}")
    arr = (x * 255).round().to(torch.uint8).numpy() if encoding == "uint8" else x.half().numpy()
    raw = arr.astype(_ARRAY_DTYPES[encoding], copy=False).tobytes()
    return {
        "format": "array",
        "dtype": encoding,
        "shape": list(arr.shape),
        "data": base64.b64encode(raw).decode("ascii"),
    }


def decode_images(obj: Any) -> torch.Tensor:
    """The JSON ``images`` object -> (N, 3, H, W) float32 in [0, 1]; PayloadError when malformed."""
    if not isinstance(obj, dict):
        raise PayloadError("'images' must be an object with 'format' and 'data'")
    if obj.get("format") == "png":
        return _decode_png(obj.get("data"))
    if obj.get("format") != "array":
        raise PayloadError(f"images.format must be 'array' or 'png', got {obj.get('format')!r}")
    dtype, shape = obj.get("dtype"), obj.get("shape")
    if dtype not in _ARRAY_DTYPES:
        raise PayloadError(f"images.dtype must be one of {sorted(_ARRAY_DTYPES)}, got {dtype!r}")
    if not (
        isinstance(shape, list)
        and len(shape) == 4
        and shape[1] == 3
        and all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape)
    ):
        raise PayloadError(f"images.shape must be [N, 3, H, W] of positive ints, got {shape!r}")
    raw = _b64(obj.get("data"), "images.data")
    expected = int(np.prod(shape)) * _ARRAY_DTYPES[dtype].itemsize
    if len(raw) != expected:
        raise PayloadError(f"images.data has {len(raw)} bytes; shape {shape} of {dtype} needs {expected}")
    arr = np.frombuffer(raw, dtype=_ARRAY_DTYPES[dtype]).reshape(shape)
    x = torch.from_numpy(arr.astype(np.float32))
    return x / 255.0 if dtype == "uint8" else x


def _b64(data: Any, what: str) -> bytes:
    if not isinstance(data, str):
        raise PayloadError(f"{what} must be a base64 string")
    try:
        return base64.b64decode(data, validate=True)
    except ValueError as exc:
        raise PayloadError(f"{what} is not valid base64: {exc}") from exc


def _decode_png(data: Any) -> torch.Tensor:
    if not isinstance(data, list) or not data:
        raise PayloadError("images.data must be a non-empty list of base64 PNGs")
    arrays = []
    for i, item in enumerate(data):
        try:
            with Image.open(io.BytesIO(_b64(item, f"images.data[{i}]"))) as im:
                arrays.append(np.asarray(im.convert("RGB")))
        except (OSError, Image.DecompressionBombError) as exc:
            raise PayloadError(f"images.data[{i}] is not a readable image: {exc}") from exc
    if len({a.shape for a in arrays}) > 1:
        raise PayloadError(f"all images must have one size, got {sorted({a.shape[:2] for a in arrays})}")
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0


class RemoteReward:
    """Call with (N, 3, H, W) in [0, 1] and N prompts -> (N,) float32 from the server."""

    def __init__(
        self,
        url: str,
        timeout: float,
        retries: int,
        encoding: str,
        backoff: float,
        token_env: str = TOKEN_ENV,
    ) -> None:
        self.url, self.timeout, self.retries = url.rstrip("/"), timeout, retries
        self.encoding, self.backoff, self.token_env = encoding, backoff, token_env

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        token = os.environ.get(self.token_env, "").strip()
        if token:
            headers["Authorization"] = f"Bearer {token}"
        return headers

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        if images.ndim != 4 or images.shape[0] != len(prompts):
            raise RewardError(f"reward 'remote': {tuple(images.shape)} images for {len(prompts)} prompts")
        body = json.dumps({"prompts": list(prompts), "images": encode_images(images, self.encoding)}).encode()
        scores = self._post(body).get("scores")
        if not (
            isinstance(scores, list)
            and len(scores) == len(prompts)
            and all(isinstance(s, int | float) and not isinstance(s, bool) for s in scores)
        ):
            raise RewardError(
                f"reward 'remote': {self.url} sent no list of {len(prompts)} scores: {str(scores)[:200]}"
            )
        return torch.tensor(scores, dtype=torch.float32)

    def _post(self, body: bytes) -> dict[str, Any]:
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            request = urllib.request.Request(
                f"{self.url}/score", data=body, method="POST", headers=self._headers()
            )
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return _json(response.read(), self.url)
            except urllib.error.HTTPError as exc:
                message = _error_text(exc)
                if exc.code not in _RETRY_STATUS:  # a bad request or a failing reward: retrying cannot help
                    hint = _FINAL_HINTS.get(exc.code, "").format(env=self.token_env, server_env=TOKEN_ENV)
                    raise RewardError(
                        f"reward 'remote': {self.url} answered {exc.code}: {message}"
                        + (f" ({hint})" if hint else "")
                    ) from exc
                last = f"HTTP {exc.code}: {message}"
            except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException) as exc:
                last = self._describe(exc)
        raise RewardError(
            f"reward 'remote': no answer from {self.url} after {self.retries + 1} attempt(s) (last: {last}); "
            "is the server running? Start one with: sdpo reward-server --reward NAME --port PORT"
        )

    def _describe(self, exc: Exception) -> str:
        reason = getattr(exc, "reason", exc)
        if isinstance(reason, TimeoutError):
            return f"timed out after {self.timeout}s"
        return f"{type(reason).__name__}: {reason}"


def _json(raw: bytes, url: str) -> dict[str, Any]:
    try:
        obj = json.loads(raw)
    except ValueError as exc:
        raise RewardError(f"reward 'remote': {url} sent invalid JSON: {raw[:200]!r}") from exc
    if not isinstance(obj, dict):
        raise RewardError(f"reward 'remote': {url} sent {type(obj).__name__}, expected an object")
    return obj


def _error_text(exc: urllib.error.HTTPError) -> str:
    try:
        return str(json.loads(exc.read()).get("error", exc.reason))
    except (ValueError, AttributeError, OSError):
        return str(exc.reason)


def build(
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    url: str | None = None,
    timeout: float = 30.0,
    retries: int = 3,
    encoding: str = "float16",
    backoff: float = 0.5,
    token_env: str = TOKEN_ENV,
) -> RemoteReward:
    """A client of ``url`` (``device``/``dtype`` belong to the server, which has its own)."""
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise RewardError(f"reward 'remote' needs options.url like 'http://127.0.0.1:8000', got {url!r}")
    if encoding not in ENCODINGS:
        raise RewardError(f"reward 'remote': encoding must be one of {ENCODINGS}, got {encoding!r}")
    numbers = {"timeout": timeout, "retries": retries, "backoff": backoff}
    not_numbers = {k: v for k, v in numbers.items() if isinstance(v, bool) or not isinstance(v, int | float)}
    if not_numbers or (isinstance(retries, float) and not retries.is_integer()):
        raise RewardError(
            f"reward 'remote': timeout, retries and backoff must be numbers, got {not_numbers or numbers}"
        )
    if not (0 < timeout < float("inf")) or retries < 0 or not (0 <= backoff < float("inf")):
        raise RewardError("reward 'remote': timeout must be > 0, retries >= 0 and backoff >= 0")
    if not isinstance(token_env, str) or not token_env:
        raise RewardError(f"reward 'remote': token_env must name an environment variable, got {token_env!r}")
    return RemoteReward(url, float(timeout), int(retries), encoding, float(backoff), token_env)
