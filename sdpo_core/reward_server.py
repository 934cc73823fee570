"""A small HTTP server that scores images with any registered reward (``sdpo reward-server``).

    sdpo reward-server --reward aesthetic --port 8000 --set reward.options.path=/models/aesthetic
    python -m sdpo_core.reward_server --reward jpeg_compressibility --port 8000   # same thing

``POST /score`` scores a batch, ``GET /health`` says which reward is served; the wire format is
described in :mod:`sdpo_core.rewards.remote`, whose ``remote`` reward is the client. Standard
library only (``http.server``). It binds 127.0.0.1 unless ``--host`` says otherwise, and has no
authentication: expose it beyond the machine only on a network you trust. Requests are scored
one at a time (a lock around the reward) since a model on one GPU gains nothing from overlap.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch

from sdpo_core.config import ConfigError, apply_overrides
from sdpo_core.rewards import RewardError, RewardFn, build_reward, check_rewards
from sdpo_core.rewards.remote import PayloadError, decode_images

log = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class RewardHTTPServer(ThreadingHTTPServer):
    """Holds the reward; handler threads are daemons so a stuck request never blocks shutdown."""

    daemon_threads = True

    def __init__(
        self, address: tuple[str, int], reward_fn: RewardFn, reward_name: str, max_request_bytes: int
    ) -> None:
        super().__init__(address, _Handler)
        self.reward_fn, self.reward_name = reward_fn, reward_name
        self.max_request_bytes = max_request_bytes
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        host = self.server_address[0]
        host = host.decode() if isinstance(host, bytes) else host
        return f"http://{host}:{self.server_address[1]}"


def parse_request(payload: Any) -> tuple[torch.Tensor, list[str]]:
    """JSON body -> (images (N, 3, H, W) float32 in [0, 1], N prompts); PayloadError when malformed."""
    if not isinstance(payload, dict):
        raise PayloadError("the body must be a JSON object with 'prompts' and 'images'")
    prompts = payload.get("prompts")
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise PayloadError("'prompts' must be a list of strings")
    images = decode_images(payload.get("images"))
    if images.shape[0] != len(prompts):
        raise PayloadError(f"{images.shape[0]} images but {len(prompts)} prompts")
    return images, prompts


class _Handler(BaseHTTPRequestHandler):
    server: RewardHTTPServer
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802  (http.server's naming)
        if self.path.rstrip("/") == "/health":
            self._send(200, {"status": "ok", "reward": self.server.reward_name})
        else:
            self._send(404, {"error": f"no such endpoint {self.path}; use POST /score or GET /health"})

    def do_POST(self) -> None:  # noqa: N802
        if self.path.rstrip("/") != "/score":
            self._send(404, {"error": f"no such endpoint {self.path}; use POST /score or GET /health"})
            return
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self._send(411, {"error": "a Content-Length header is required"})
            return
        if int(length) > self.server.max_request_bytes:
            self._send(
                413,
                {
                    "error": f"body of {length} bytes exceeds {self.server.max_request_bytes}; send fewer images"
                },
            )
            self.close_connection = True
            return
        body = self.rfile.read(int(length))
        try:
            images, prompts = parse_request(json.loads(body))
        except (ValueError, PayloadError) as exc:  # JSONDecodeError is a ValueError
            self._send(400, {"error": f"bad payload: {exc}"})
            return
        self._send(*self._score(images, prompts))

    def _score(self, images: torch.Tensor, prompts: list[str]) -> tuple[int, dict[str, Any]]:
        name = self.server.reward_name
        try:
            with self.server.lock:
                values = check_rewards(name, self.server.reward_fn(images, prompts), len(prompts))
        # Any failure of the reward goes back to the client as a 500 rather than a dropped connection.
        except Exception as exc:
            log.exception("reward '%s' failed", name)
            return 500, {"error": f"reward '{name}' failed: {type(exc).__name__}: {exc}"}
        return 200, {"scores": values.tolist(), "reward": name}

    def _send(self, status: int, obj: dict[str, Any]) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        try:
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (its timeout); nothing to tell
            log.info("client %s left before its answer", self.address_string())

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002  (http.server's signature)
        log.info("%s %s", self.address_string(), format % args)


def make_server(
    reward_fn: RewardFn,
    reward_name: str,
    host: str = "127.0.0.1",
    port: int = 0,
    max_request_bytes: int = 256 * 2**20,
) -> RewardHTTPServer:
    """Bind (port 0 = any free port; see ``.url``) without serving yet: call ``serve_forever()``."""
    return RewardHTTPServer((host, port), reward_fn, reward_name, max_request_bytes)


def _options(sets: Sequence[str]) -> dict[str, Any]:
    """``reward.options.k=v`` overrides -> the options dict (values read as YAML, as ``--set`` is)."""
    bad = [s for s in sets if not s.startswith("reward.options.")]
    if bad:
        raise RewardError(f"--set here takes reward.options.KEY=VALUE only, got {bad}")
    try:
        return apply_overrides({}, list(sets)).get("reward", {}).get("options", {})
    except ConfigError as exc:
        raise RewardError(str(exc)) from exc


def main(argv: Sequence[str] | None = None) -> int:
    """``sdpo reward-server``: build the reward, then serve it until interrupted."""
    parser = argparse.ArgumentParser(prog="sdpo reward-server", description="Serve a reward over HTTP.")
    parser.add_argument("--reward", required=True, help="registered reward name or module:function")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="reward.options.KEY=VALUE")
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="device of the reward model (default cuda when available)",
    )
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--max-request-mb", type=float, default=256.0, help="largest accepted request body")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        reward_fn = build_reward(args.reward, _options(args.sets), args.device, DTYPES[args.dtype])
        server = make_server(reward_fn, args.reward, args.host, args.port, int(args.max_request_mb * 2**20))
    except (RewardError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning(
            "listening on %s without authentication: anyone who can reach it can use the reward", args.host
        )
    print(
        f"serving reward '{args.reward}' on {server.url} (POST /score, GET /health); Ctrl-C stops", flush=True
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
