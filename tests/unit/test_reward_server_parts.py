"""The reward server's parts without a server: the PNG header reader, the payload check before
decoding, the limits' validation and the batcher's grouping and per-request failures."""

from __future__ import annotations

import asyncio
import base64
import io

import pytest
import torch
from PIL import Image

from sdpo_core.rewards import RewardError
from sdpo_core.rewards.remote import PayloadError
from sdpo_core.rewards.server_batch import Batcher
from sdpo_core.rewards.server_limits import LimitError, Limits, check_payload, png_size


def _png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height)).save(buf, format="PNG")
    return buf.getvalue()


def test_png_size_reads_the_ihdr_chunk():
    assert png_size(_png(37, 11)[:24]) == (37, 11)
    with pytest.raises(ValueError, match="not a PNG"):
        png_size(b"GIF89a" + b"\0" * 30)


def _png_payload(*sizes: tuple[int, int]) -> dict:
    data = [base64.b64encode(_png(w, h)).decode() for w, h in sizes]
    return {"prompts": ["a"] * len(sizes), "images": {"format": "png", "data": data}}


def test_check_payload_counts_pixels_of_all_images_and_images_and_prompts():
    limits = Limits(max_images=3, max_pixels=1000)
    check_payload(_png_payload((10, 50), (10, 50)), limits)  # exactly 1000
    with pytest.raises(LimitError, match="2 images of 1,010 pixels"):
        check_payload(_png_payload((10, 50), (10, 51)), limits)
    with pytest.raises(LimitError, match="4 images exceed"):
        check_payload({"prompts": ["a"] * 4, "images": {}}, limits)
    array = {"format": "array", "dtype": "uint8", "shape": [2, 3, 20, 30], "data": ""}
    with pytest.raises(LimitError, match="1,200 pixels"):
        check_payload({"prompts": ["a", "b"], "images": array}, limits)
    with pytest.raises(PayloadError, match=r"images.data\[0\] is not a readable image"):
        check_payload({"prompts": ["a"], "images": {"format": "png", "data": ["R0lGODlh" * 8]}}, limits)


@pytest.mark.parametrize("field", ["max_in_flight", "max_batch", "read_timeout_s", "batch_wait_s"])
def test_limits_refuse_zero_negative_and_nan(field):
    for bad in (-1, float("nan")) if field == "batch_wait_s" else (0, -1, float("nan")):
        with pytest.raises(ValueError, match=field):
            Limits(**{field: bad})


def _reward(calls: list[int]):
    def reward(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        calls.append(images.shape[0])
        values = images.mean(dim=(1, 2, 3)) * torch.tensor([float(len(p)) for p in prompts])
        return torch.where(torch.tensor([p == "nan" for p in prompts]), float("nan"), values)

    return reward


async def _score_together(batcher: Batcher, jobs: list[tuple[torch.Tensor, list[str]]]) -> list:
    worker = asyncio.create_task(batcher.run())
    try:
        return await asyncio.wait_for(
            asyncio.gather(*(batcher.score(x, p) for x, p in jobs), return_exceptions=True), 10
        )
    finally:
        worker.cancel()


def test_batcher_groups_same_sized_requests_up_to_max_batch_in_arrival_order():
    calls: list[int] = []
    g = torch.Generator().manual_seed(0)
    jobs = [
        (torch.rand(2, 3, 8, 8, generator=g), ["a", "bb"]),
        (torch.rand(2, 3, 8, 8, generator=g), ["ccc", "d"]),
        (torch.rand(1, 3, 4, 4, generator=g), ["e"]),  # another size: never in the same call
        (torch.rand(3, 3, 8, 8, generator=g), ["f", "g", "h"]),
    ]
    batcher = Batcher(_reward(calls), "r", max_batch=4, wait_s=0.05)
    results = asyncio.run(_score_together(batcher, jobs))
    assert calls == [4, 1, 3]
    assert [(r.batch_images, r.batch_requests) for r in results] == [(4, 2), (4, 2), (1, 1), (3, 1)]
    for result, (x, p) in zip(results, jobs, strict=True):
        torch.testing.assert_close(result.values, _reward([])(x, p), rtol=0, atol=0)


def test_non_finite_scores_fail_only_their_request():
    images = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    batcher = Batcher(_reward([]), "r", max_batch=8, wait_s=0.05)
    good, bad = asyncio.run(_score_together(batcher, [(images, ["ok"]), (images, ["nan"])]))
    assert good.batch_requests == 2 and torch.isfinite(good.values).all()
    assert isinstance(bad, RewardError) and "non-finite" in str(bad)


def test_a_failing_reward_fails_every_request_of_its_batch():
    def broken(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        raise RuntimeError("CUDA out of memory")

    images = torch.rand(1, 3, 8, 8)
    batcher = Batcher(broken, "r", max_batch=8, wait_s=0.05)
    results = asyncio.run(_score_together(batcher, [(images, ["a"]), (images, ["b"])]))
    assert all(isinstance(r, RuntimeError) for r in results)
