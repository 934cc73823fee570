"""The reward server and the ``remote`` reward over loopback: equality with local scoring,
timeouts, a server that is down, bad payloads, and ``main`` as a user starts it."""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager

import pytest
import torch

from sdpo_core.rewards import RewardError, build_reward
from sdpo_core.rewards.server import main, make_server
from sdpo_core.rewards.server_limits import Limits

PROMPTS = ["a cat", "a red car", "dog", "a blue tree painting"]


def smooth_reward(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """(N,) depends on every pixel and on the prompt."""
    weights = torch.linspace(0.5, 1.5, images.shape[-1])
    return (images.float() * weights).mean(dim=(1, 2, 3)) * torch.tensor([1.0 + len(p) for p in prompts])


def slow_reward(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    time.sleep(1.0)
    return torch.zeros(images.shape[0])


def nan_reward(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    return torch.full((images.shape[0],), float("nan"))


@contextmanager
def serving(reward_fn, name: str = "test", **limits):
    server = make_server(reward_fn, name, "127.0.0.1", 0, Limits(**limits))
    thread = threading.Thread(target=server.serve, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.server.started, "the server did not start within 10s"
    try:
        yield server.url
    finally:
        server.stop()
        thread.join(timeout=10)


def _images(n: int = 4, h: int = 24, w: int = 32) -> torch.Tensor:
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(0))


def _post(url: str, body: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(
        f"{url}/score", data=body, method="POST", headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------ equality with local scoring


@pytest.mark.parametrize("encoding", ["float16", "uint8", "png"])
def test_remote_batch_equals_local_scoring(encoding):
    images = _images()
    # What the wire carries: fp16 values, or 8-bit pixels.
    sent = images.half().float() if encoding == "float16" else (images * 255).round() / 255
    with serving(smooth_reward) as url:
        remote = build_reward("remote", {"url": url, "encoding": encoding})
        got = remote(images, PROMPTS)
    assert got.shape == (4,) and got.dtype == torch.float32
    torch.testing.assert_close(got, smooth_reward(sent, PROMPTS), rtol=0, atol=1e-6)


def test_serving_a_registered_reward_matches_it_exactly():
    images = _images(h=64, w=48)
    local = build_reward("jpeg_compressibility")
    with serving(local, "jpeg_compressibility") as url:
        got = build_reward("remote", {"url": url, "encoding": "uint8"})(images, PROMPTS)
    torch.testing.assert_close(got, local(images, PROMPTS), rtol=0, atol=0)


def test_health_names_the_reward():
    with serving(smooth_reward, "smooth") as url, urllib.request.urlopen(f"{url}/health", timeout=5) as r:
        assert json.loads(r.read()) == {"status": "ok", "reward": "smooth"}


# ------------------------------------------------------------------ failures


def test_slow_reward_times_out_with_a_clear_error():
    with serving(slow_reward) as url:
        remote = build_reward("remote", {"url": url, "timeout": 0.2, "retries": 1, "backoff": 0.01})
        start = time.perf_counter()
        with pytest.raises(RewardError, match=r"after 2 attempt\(s\) \(last: timed out after 0.2s\)"):
            remote(_images(1), PROMPTS[:1])
        assert time.perf_counter() - start < 1.5


def test_server_down_fails_after_retries():
    url = f"http://127.0.0.1:{_free_port()}"
    remote = build_reward("remote", {"url": url, "retries": 2, "backoff": 0.01, "timeout": 2})
    with pytest.raises(RewardError) as err:
        remote(_images(1), PROMPTS[:1])
    text = str(err.value)
    assert url in text and "3 attempt(s)" in text and "sdpo reward-server" in text and "Connection" in text


def test_failing_reward_is_a_500_and_not_retried():
    with serving(nan_reward, "nanny") as url:
        remote = build_reward("remote", {"url": url, "retries": 3, "backoff": 5.0})
        start = time.perf_counter()
        with pytest.raises(RewardError, match=r"answered 500: reward 'nanny' failed: .*non-finite"):
            remote(_images(2), PROMPTS[:2])
        assert time.perf_counter() - start < 2.0, "a server-side failure must not be retried"


def _array_images(shape, dtype="uint8", nbytes=None):
    n = nbytes if nbytes is not None else int(torch.tensor(shape).prod()) * (2 if dtype == "float16" else 1)
    return {"format": "array", "dtype": dtype, "shape": shape, "data": base64.b64encode(b"\0" * n).decode()}


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{not json", "bad payload"),
        (json.dumps([1, 2]).encode(), "must be a JSON object"),
        (json.dumps({"prompts": "a cat", "images": {}}).encode(), "'prompts' must be a list of strings"),
        (json.dumps({"prompts": ["a"], "images": {"format": "jpeg"}}).encode(), "images.format must be"),
        (
            json.dumps({"prompts": ["a"], "images": _array_images([1, 4, 2, 2])}).encode(),
            r"images.shape must be \[N, 3",
        ),
        (
            json.dumps({"prompts": ["a"], "images": _array_images([1, 3, 2, 2], "int32")}).encode(),
            "images.dtype",
        ),
        (
            json.dumps({"prompts": ["a"], "images": _array_images([1, 3, 2, 2], nbytes=5)}).encode(),
            "has 5 bytes",
        ),
        (
            json.dumps({"prompts": ["a", "b"], "images": _array_images([1, 3, 2, 2])}).encode(),
            "1 images but 2 prompts",
        ),
        (
            json.dumps({"prompts": ["a"], "images": {"format": "png", "data": ["!!"]}}).encode(),
            "not valid base64",
        ),
        (
            json.dumps({"prompts": ["a"], "images": {"format": "png", "data": ["AAAA"]}}).encode(),
            "not a readable image",
        ),
    ],
)
def test_bad_payload_is_a_400_with_a_message(body, message):
    import re

    with serving(smooth_reward) as url:
        status, answer = _post(url, body)
    assert status == 400 and re.search(message, answer["error"]), answer


def test_client_does_not_retry_a_400(monkeypatch):
    from sdpo_core.rewards import remote as remote_mod

    monkeypatch.setattr(remote_mod, "encode_images", lambda images, enc: {"format": "bogus"})
    with serving(smooth_reward) as url:
        client = build_reward("remote", {"url": url, "backoff": 5.0})
        with pytest.raises(RewardError, match="answered 400: bad payload"):
            client(_images(1), PROMPTS[:1])


def test_too_large_and_unknown_paths():
    with serving(smooth_reward, max_request_bytes=100) as url:
        status, answer = _post(url, b"x" * 1000)
        assert status == 413 and "exceeds 100" in answer["error"]
        client = build_reward("remote", {"url": url, "backoff": 5.0})
        with pytest.raises(RewardError, match=r"answered 413: body of \d+ bytes exceeds 100 .*not retried"):
            client(_images(1), PROMPTS[:1])
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"{url}/nothing", timeout=5)
        assert err.value.code == 404


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({}, "needs options.url"),
        ({"url": "127.0.0.1:8000"}, "needs options.url like"),
        ({"url": "http://x", "encoding": "jpeg"}, "encoding must be one of"),
        ({"url": "http://x", "timeout": 0}, "timeout must be > 0"),
        ({"url": "http://x", "timeout": "abc"}, "must be numbers, got {'timeout': 'abc'}"),
        ({"url": "http://x", "retries": True}, "must be numbers"),
        ({"url": "http://x", "token_env": ""}, "token_env must name an environment variable"),
    ],
)
def test_remote_rejects_bad_options(options, message):
    with pytest.raises(RewardError, match=message):
        build_reward("remote", options)


# ------------------------------------------------------------------ main(argv)


def test_main_reports_bad_arguments(capsys):
    assert main(["--reward", "no_such_reward", "--port", "0"]) == 2
    assert "unknown reward 'no_such_reward'" in capsys.readouterr().err
    assert main(["--reward", "jpeg_compressibility", "--port", "0", "--set", "train.epochs=3"]) == 2
    assert "reward.options.KEY=VALUE only" in capsys.readouterr().err


def test_main_serves_until_stopped(tmp_path):
    """``python -m sdpo_core.rewards.server`` (what ``sdpo reward-server`` runs), options via --set."""
    port = _free_port()
    cmd = [
        sys.executable,
        "-m",
        "sdpo_core.rewards.server",
        "--reward",
        "jpeg_compressibility",
        "--port",
        str(port),
        "--set",
        "reward.options.quality=50",
        "--device",
        "cpu",
    ]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    try:
        line = proc.stdout.readline()
        assert f"serving reward 'jpeg_compressibility' on http://127.0.0.1:{port}" in line, line
        remote = build_reward("remote", {"url": f"http://127.0.0.1:{port}", "encoding": "uint8"})
        images = _images(2, 40, 40)
        want = build_reward("jpeg_compressibility", {"quality": 50})(images, PROMPTS[:2])
        torch.testing.assert_close(remote(images, PROMPTS[:2]), want, rtol=0, atol=0)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
