"""An HTTP server that scores images with any registered reward (``sdpo reward-server``).

    sdpo reward-server --reward aesthetic --port 8000 --set reward.options.path=/models/aesthetic
    SDPO_REWARD_TOKEN=... sdpo reward-server --reward aesthetic --host 0.0.0.0   # beyond this machine
    python -m sdpo_core.rewards.server --reward jpeg_compressibility --port 8000   # same thing

``POST /score`` scores a batch, ``GET /health`` says which reward is served; the wire format is
described in :mod:`sdpo_core.rewards.remote`, whose ``remote`` reward is the client.

Built on FastAPI + uvicorn rather than LitServe: both are already in the resolved environment
(pinned in constraints.txt through mlflow), so serving adds no dependency, and what LitServe would
bring, batching, is a queue and one worker here (:mod:`sdpo_core.rewards.server_batch`), while the
limits (:mod:`sdpo_core.rewards.server_limits`) need uvicorn's protocol layer in any case.

What it refuses, before work or memory is spent:
- a missing or wrong bearer token (401) when ``SDPO_REWARD_TOKEN`` is set; the token is required
  to bind anything but loopback (without one, exit 2);
- a client that has not sent a whole request ``--read-timeout`` seconds after connecting (dropped);
- a body over ``--max-request-mb`` (413, from Content-Length and while reading);
- more than ``--max-in-flight`` requests at once (503 at once; the client retries 503);
- more than ``--max-images`` images or ``--max-pixels`` decoded pixels, read from the array shape
  or each PNG header before anything is decoded (413).
Requests that arrive together are scored in one reward call of up to ``--max-batch`` images.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import ipaddress
import json
import logging
import os
import socket
import sys
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from sdpo_core.rewards import RewardError, RewardFn, build_reward
from sdpo_core.rewards.remote import TOKEN_ENV, PayloadError, decode_images
from sdpo_core.rewards.server_args import DTYPES, add_arguments, limits_from_args, reward_options
from sdpo_core.rewards.server_batch import Batcher, Scored
from sdpo_core.rewards.server_limits import LimitError, Limits, check_payload, protocol_with_deadline

log = logging.getLogger(__name__)
MIN_TOKEN_CHARS = 16


class _Answer(Exception):
    """Ends a request early with ``status`` and an error message."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.headers = status, headers or {}


def parse_request(payload: Any, limits: Limits) -> tuple[torch.Tensor, list[str]]:
    """JSON body -> (images (N, 3, H, W) float32 in [0, 1], N prompts); LimitError before decoding
    when over ``limits``, PayloadError when malformed."""
    if not isinstance(payload, dict):
        raise PayloadError("the body must be a JSON object with 'prompts' and 'images'")
    check_payload(payload, limits)
    prompts = payload.get("prompts")
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise PayloadError("'prompts' must be a list of strings")
    images = decode_images(payload.get("images"))
    if images.shape[0] != len(prompts):
        raise PayloadError(f"{images.shape[0]} images but {len(prompts)} prompts")
    return images, prompts


def _parse_body(body: bytes, limits: Limits) -> tuple[torch.Tensor, list[str]]:
    try:
        return parse_request(json.loads(body), limits)
    except LimitError as exc:
        raise _Answer(413, str(exc)) from exc
    except ValueError as exc:  # PayloadError and JSONDecodeError
        raise _Answer(400, f"bad payload: {exc}") from exc


async def _read_body(request: Request, limit: int) -> bytes:
    length = request.headers.get("content-length")
    if length is None or not length.isdigit():
        raise _Answer(411, "a Content-Length header is required", {"Connection": "close"})
    if int(length) > limit:
        await _drain(request)
        raise _Answer(
            413,
            f"body of {length} bytes exceeds {limit} bytes (--max-request-mb); send fewer images",
            {"Connection": "close"},
        )
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:  # h11 already refuses more than Content-Length; this guards the limit itself
            raise _Answer(
                413,
                f"body exceeds {limit} bytes (--max-request-mb); send fewer images",
                {"Connection": "close"},
            )
        chunks.append(chunk)
    return b"".join(chunks)


def _authorized(request: Request, token: str | None) -> bool:
    if token is None:
        return True
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())


async def _drain(request: Request) -> None:
    """Read and drop a refused request's body, so that its client reads the answer rather than a
    reset connection; it costs no memory, and the read deadline bounds its time."""
    async for _ in request.stream():
        pass


def create_app(reward_fn: RewardFn, reward_name: str, limits: Limits, token: str | None) -> FastAPI:
    """The ASGI app: ``POST /score`` and ``GET /health``, with its batching worker as lifespan."""
    batcher = Batcher(reward_fn, reward_name, limits.max_batch, limits.batch_wait_s)
    in_flight = 0

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        worker = asyncio.create_task(batcher.run())
        yield
        worker.cancel()

    app = FastAPI(lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
        hint = "use POST /score or GET /health"
        return JSONResponse(
            {"error": f"{exc.detail}: {request.method} {request.url.path}; {hint}"}, exc.status_code
        )

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok", "reward": reward_name}

    @app.post("/score")
    async def score(request: Request) -> JSONResponse:
        nonlocal in_flight
        start, n, batch = time.perf_counter(), 0, "-"
        try:
            if not _authorized(request, token):
                await _drain(request)
                raise _Answer(
                    401,
                    f"missing or wrong bearer token (the server's {TOKEN_ENV})",
                    {"WWW-Authenticate": "Bearer"},
                )
            if in_flight >= limits.max_in_flight:
                raise _Answer(
                    503,
                    f"busy: {in_flight} requests in flight; retry later",
                    {"Retry-After": "1", "Connection": "close"},
                )
            in_flight += 1
            try:
                images, prompts = await asyncio.to_thread(
                    _parse_body, await _read_body(request, limits.max_request_bytes), limits
                )
                n = len(prompts)
                scored = await _scored(batcher, images, prompts)
            finally:
                in_flight -= 1
            batch = f"{scored.batch_images}/{scored.batch_requests}"
            response = JSONResponse(
                {"scores": scored.values.tolist(), "reward": reward_name},
                headers={
                    "X-Batch-Images": str(scored.batch_images),
                    "X-Batch-Requests": str(scored.batch_requests),
                },
            )
        except _Answer as answer:
            response = JSONResponse({"error": str(answer)}, answer.status, headers=answer.headers)
        except ClientDisconnect:
            response = JSONResponse({"error": "client left"}, 400)
        ms = (time.perf_counter() - start) * 1000
        client = f"{request.client.host}:{request.client.port}" if request.client else "-"
        log.info("POST /score %d n=%d batch=%s %.0fms from %s", response.status_code, n, batch, ms, client)
        return response

    return app


async def _scored(batcher: Batcher, images: torch.Tensor, prompts: list[str]) -> Scored:
    try:
        return await batcher.score(images, prompts)
    # Any failure of the reward goes back to the client as a 500 rather than a dropped connection.
    except Exception as exc:
        log.exception("reward '%s' failed", batcher.name)
        raise _Answer(500, f"reward '{batcher.name}' failed: {type(exc).__name__}: {exc}") from exc


class RewardServer:
    """A bound socket and the uvicorn server that will serve ``app`` on it: ``serve()`` blocks
    until ``stop()`` (or SIGINT/SIGTERM in the main thread)."""

    def __init__(self, app: FastAPI, sock: socket.socket, limits: Limits) -> None:
        self.sock = sock
        config = uvicorn.Config(
            app,
            http=protocol_with_deadline(limits.read_timeout_s),
            timeout_keep_alive=limits.keep_alive_s,  # type: ignore[arg-type]  (uvicorn takes a float)
            limit_concurrency=2 * limits.max_in_flight + 16,  # connections, idle ones included
            log_config=None,
            access_log=False,
            server_header=False,
            timeout_graceful_shutdown=5,
        )
        self.server = uvicorn.Server(config)

    @property
    def url(self) -> str:
        host, port = self.sock.getsockname()[:2]
        return f"http://{f'[{host}]' if ':' in host else host}:{port}"

    def serve(self) -> None:
        self.server.run(sockets=[self.sock])

    def stop(self) -> None:
        self.server.should_exit = True


def make_server(
    reward_fn: RewardFn,
    reward_name: str,
    host: str = "127.0.0.1",
    port: int = 0,
    limits: Limits | None = None,
    token: str | None = None,
) -> RewardServer:
    """Bind (port 0 = any free port; see ``.url``) without serving yet: call ``serve()``."""
    limits = limits or Limits()
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.create_server((host, port), family=family)
    return RewardServer(create_app(reward_fn, reward_name, limits, token), sock, limits)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def server_token(host: str, environ: dict[str, str] | os._Environ[str] = os.environ) -> str | None:
    """``SDPO_REWARD_TOKEN``, or None on loopback without one; RewardError when the host needs one
    and has none, or when it is too short to stand guessing."""
    token = environ.get(TOKEN_ENV, "").strip() or None
    if token is None and not is_loopback(host):
        raise RewardError(
            f"--host {host} is reachable beyond this machine: set {TOKEN_ENV} (e.g. to the output of "
            "python -c 'import secrets; print(secrets.token_urlsafe(32))') and give clients the same"
        )
    if token is not None and len(token) < MIN_TOKEN_CHARS:
        raise RewardError(f"{TOKEN_ENV} has {len(token)} characters; use at least {MIN_TOKEN_CHARS}")
    return token


def main(argv: Sequence[str] | None = None) -> int:
    """``sdpo reward-server``: build the reward, then serve it until interrupted."""
    parser = argparse.ArgumentParser(prog="sdpo reward-server", description="Serve a reward over HTTP.")
    add_arguments(parser)
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        limits = limits_from_args(args)
        token = server_token(args.host)
        reward_fn = build_reward(args.reward, reward_options(args.sets), args.device, DTYPES[args.dtype])
        server = make_server(reward_fn, args.reward, args.host, args.port, limits, token)
    except (RewardError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    auth = f"bearer token from {TOKEN_ENV}" if token else "no token (loopback only)"
    print(
        f"serving reward '{args.reward}' on {server.url} (POST /score, GET /health; {auth}); Ctrl-C stops",
        flush=True,
    )
    log.info("limits: %s", limits)
    try:
        server.serve()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
