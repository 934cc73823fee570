"""``sdpo reward-server`` as a real process on 127.0.0.1 against what a network brings: clients
without the token, slow clients, PNG bombs, more clients than it serves at once, and requests that
arrive together (batched into one reward call, with the in-process reward's values)."""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image
from reward_server_fns import slow_score

from sdpo_core.rewards import RewardError, build_reward
from sdpo_core.rewards.remote import TOKEN_ENV, encode_images

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
TOKEN = "test-token-0123456789abcdef"
LIMITS = [
    "--max-in-flight",
    "3",
    "--max-batch",
    "16",
    "--batch-wait-ms",
    "50",
    "--read-timeout",
    "1.5",
    "--max-pixels",
    "1000000",
    "--max-images",
    "16",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != TOKEN_ENV}
    return {**env, "HF_HUB_OFFLINE": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{HERE}", **extra}


def _server_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "sdpo_core.rewards.server", "--device", "cpu", *args]


class Served:
    def __init__(self, proc: subprocess.Popen, port: int) -> None:
        self.proc, self.port, self.url = proc, port, f"http://127.0.0.1:{port}"

    def rss_kb(self) -> int:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:")))

    def healthy(self) -> bool:
        with urllib.request.urlopen(f"{self.url}/health", timeout=5) as r:
            return json.loads(r.read()) == {"status": "ok", "reward": "reward_server_fns:slow_score"}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    port = _free_port()
    log = (tmp_path_factory.mktemp("server") / "server.log").open("w")
    cmd = _server_cmd("--reward", "reward_server_fns:slow_score", "--port", str(port), *LIMITS)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_env(**{TOKEN_ENV: TOKEN}))
    server = Served(proc, port)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if server.healthy():
                break
        except OSError:
            time.sleep(0.1)
    assert proc.poll() is None and server.healthy(), Path(log.name).read_text()
    yield server
    proc.terminate()
    proc.wait(timeout=10)
    log.close()


def _images(n: int, seed: int = 0, h: int = 24, w: int = 32) -> torch.Tensor:
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


def _body(images: torch.Tensor, prompts: list[str], encoding: str = "uint8") -> bytes:
    return json.dumps({"prompts": prompts, "images": encode_images(images, encoding)}).encode()


def _post(url: str, body: bytes, token: str | None = TOKEN) -> tuple[int, dict, dict]:
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(f"{url}/score", data=body, method="POST", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=20) as response:
            return response.status, json.loads(response.read()), dict(response.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read()), dict(exc.headers)


def _sent(images: torch.Tensor) -> torch.Tensor:
    """What the server decodes from uint8: 8-bit pixels / 255."""
    return (images * 255).round() / 255


# ------------------------------------------------------------------ the token


def test_token_is_required_and_compared(served, monkeypatch):
    body = _body(_images(2), ["a", "bb"])
    for token in (None, "", "wrong-token-0123456789abcdef", TOKEN[:-1]):
        status, answer, headers = _post(served.url, body, token)
        assert status == 401 and TOKEN_ENV in answer["error"], (token, answer)
        assert headers.get("www-authenticate") == "Bearer"
    status, answer, _ = _post(served.url, body)
    assert status == 200 and len(answer["scores"]) == 2

    remote = build_reward("remote", {"url": served.url, "encoding": "uint8", "backoff": 5.0})
    monkeypatch.setenv(TOKEN_ENV, "wrong-token-0123456789abcdef")
    start = time.monotonic()
    with pytest.raises(RewardError, match=r"answered 401: .*not retried: set SDPO_REWARD_TOKEN"):
        remote(_images(2), ["a", "bb"])
    assert time.monotonic() - start < 4.0, "a 401 must not be retried"
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    images = _images(3, seed=1)
    torch.testing.assert_close(
        remote(images, ["a", "b", "c"]), slow_score(_sent(images), ["a", "b", "c"]), rtol=0, atol=0
    )


# ------------------------------------------------------------------ slow clients


def _seconds_until_dropped(served, payload: bytes, trickle: bool = False) -> float:
    """Connect, send ``payload`` (one byte every 0.2 s when ``trickle``), then wait for the server
    to close the connection; seconds from connecting to the close (at most 10)."""
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", served.port), timeout=10) as sock:
        chunks = [payload[i : i + 1] for i in range(len(payload))] if trickle else [payload]
        try:
            for chunk in chunks[:50]:
                sock.sendall(chunk)
                if trickle:
                    time.sleep(0.2)
        except (BrokenPipeError, ConnectionResetError):
            return time.monotonic() - start
        try:
            while sock.recv(4096):
                pass
        except ConnectionResetError:
            pass
    return time.monotonic() - start


def test_slow_clients_are_dropped_after_the_read_timeout(served):
    headers = (
        f"POST /score HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
        "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n"
    ).encode()
    declared_but_silent = _seconds_until_dropped(served, headers)
    assert 1.4 < declared_but_silent < 5, declared_but_silent
    silent = _seconds_until_dropped(served, b"")
    assert 1.4 < silent < 5, silent
    trickled = _seconds_until_dropped(served, headers, trickle=True)  # would take 50 x 0.2 s = 10 s
    assert trickled < 5, trickled
    assert served.healthy()


# ------------------------------------------------------------------ limits before decoding


def _png_bomb(width: int, height: int) -> bytes:
    """A valid PNG header declaring width x height 1-bit gray, with the first rows of its data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = zlib.compress(b"\0" * ((width // 8 + 1) * 64), 9)
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


def _solid_png(size: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (200, 10, 10)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize(
    ("pngs", "message"),
    [
        (
            [_png_bomb(20000, 20000)],
            "1 images of 400,000,000 pixels in all exceed this server's limit of 1,000,000",
        ),
        ([_solid_png(2000)] * 16, "16 images of 64,000,000 pixels"),  # the 2000x2000 solid PNGs
        ([_solid_png(8)] * 17, "17 images exceed this server's limit of 16 per request"),
    ],
)
def test_png_bombs_are_refused_from_their_headers_with_memory_unchanged(served, pngs, message):
    assert len(b"".join(set(pngs))) < 200_000  # small on the wire
    warm = _body(_images(1), ["a"], "png")
    assert _post(served.url, warm)[0] == 200
    before = served.rss_kb()
    body = json.dumps(
        {
            "prompts": ["a"] * len(pngs),
            "images": {"format": "png", "data": [base64.b64encode(p).decode() for p in pngs]},
        }
    )
    status, answer, _ = _post(served.url, body.encode())
    assert status == 413 and message in answer["error"], answer
    grown_mb = (served.rss_kb() - before) / 1024
    assert grown_mb < 20, f"server memory grew {grown_mb:.0f} MB on a refused request"
    assert served.healthy()


def test_array_count_and_pixels_are_checked_before_decoding(served):
    shape = [1, 3, 2000, 2000]  # declares 4 M pixels, sends 4 bytes
    body = {
        "prompts": ["a"],
        "images": {
            "format": "array",
            "dtype": "uint8",
            "shape": shape,
            "data": base64.b64encode(b"\0" * 4).decode(),
        },
    }
    status, answer, _ = _post(served.url, json.dumps(body).encode())
    assert status == 413 and "4,000,000 pixels" in answer["error"], answer


# ------------------------------------------------------------------ many clients, batching


def _concurrently(url: str, bodies: list[bytes]) -> list[tuple[int, dict, dict]]:
    barrier = threading.Barrier(len(bodies))
    results: list = [None] * len(bodies)

    def one(i: int) -> None:
        barrier.wait(timeout=10)
        results[i] = _post(url, bodies[i])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert all(r is not None for r in results), "a client got no answer within 60 s"
    return results


def test_more_clients_than_the_cap_get_503_not_a_crash(served):
    body = _body(_images(1), ["a"])
    results = _concurrently(served.url, [body] * 12)
    statuses = sorted(r[0] for r in results)
    assert set(statuses) == {200, 503} and statuses.count(200) >= 1, statuses
    busy = next(r for r in results if r[0] == 503)
    assert "busy" in busy[1]["error"] and busy[2].get("retry-after") == "1"
    assert served.proc.poll() is None and served.healthy()
    assert _post(served.url, body)[0] == 200


def test_requests_sent_together_are_batched_with_the_in_process_values(served):
    images = [_images(2, seed=10 + i) for i in range(3)]
    prompts = [[f"p{i}", f"prompt {i}"] for i in range(3)]
    results = _concurrently(served.url, [_body(x, p) for x, p in zip(images, prompts, strict=True)])
    assert [r[0] for r in results] == [200] * 3
    assert max(int(r[2]["x-batch-requests"]) for r in results) >= 2, [r[2] for r in results]
    assert all(int(r[2]["x-batch-images"]) == 2 * int(r[2]["x-batch-requests"]) for r in results)
    for (_, answer, _), x, p in zip(results, images, prompts, strict=True):
        want = slow_score(_sent(x), p)
        torch.testing.assert_close(torch.tensor(answer["scores"], dtype=torch.float32), want, rtol=0, atol=0)


# ------------------------------------------------------------------ refusing to start


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--host", "0.0.0.0"], {}, f"--host 0.0.0.0 is reachable beyond this machine: set {TOKEN_ENV}"),
        (["--host", "127.0.0.1"], {TOKEN_ENV: "short"}, f"{TOKEN_ENV} has 5 characters; use at least 16"),
        (["--port", "99999"], {}, "a port is 0..65535, got '99999'"),
        (["--max-batch", "0"], {}, "expected a positive int, got '0'"),
        (["--batch-wait-ms", "nan"], {}, "batch_wait_s"),
    ],
)
def test_refuses_to_start_with_exit_2_and_one_line(args, env, message):
    cmd = _server_cmd("--reward", "jpeg_compressibility", "--port", "0", *args)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(**env), timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and proc.stderr.strip().splitlines()[-1].startswith(
        ("error:", "sdpo reward-server: error:")
    )
    assert "Traceback" not in proc.stderr
