"""The reward server's limits, checked before anything is decoded or held for long.

* ``Limits``: request size, image count, decoded pixels, requests in flight, batch size, timeouts.
* ``check_payload``: the count and the decoded-pixel total of a parsed ``/score`` body, read from
  the array ``shape`` or from each PNG's IHDR chunk (24 bytes), before a pixel is decoded.
* ``ReadDeadlineProtocol``: uvicorn's h11 protocol with one deadline per request for reading its
  headers and body (uvicorn itself times out only idle keep-alive connections, so a client that
  declares a Content-Length and sends nothing, or trickles headers, would hold its connection).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import struct
from dataclasses import dataclass
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from sdpo_core.rewards.remote import PayloadError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# The signature, then the IHDR chunk's length and type, then width and height (big-endian u32).
_IHDR_END = 24
_IHDR_B64_CHARS = 32  # base64 of the first 24 bytes


class LimitError(ValueError):
    """A request over the server's limits (answered 413; the client does not retry it)."""


@dataclass(frozen=True)
class Limits:
    """What one server accepts. Memory in flight is at most ``max_in_flight`` requests of
    ``max_request_bytes`` each plus ``max_pixels * 12`` bytes decoded (float32 RGB)."""

    max_request_bytes: int = 256 * 2**20
    max_images: int = 256
    max_pixels: int = 16 * 2**20  # decoded pixels per request, all images together
    max_in_flight: int = 8  # requests being read, queued or scored; beyond: 503
    max_batch: int = 64  # images per reward call when requests are batched
    batch_wait_s: float = 0.005  # how long the first request of a batch waits for others
    read_timeout_s: float = 30.0  # to read one request's headers and body
    keep_alive_s: float = 5.0  # an idle connection between requests

    def __post_init__(self) -> None:
        counts = ("max_request_bytes", "max_images", "max_pixels", "max_in_flight", "max_batch")
        bad = [k for k in counts if not (isinstance(getattr(self, k), int) and getattr(self, k) >= 1)]
        bad += [k for k in ("read_timeout_s", "keep_alive_s") if not 0 < getattr(self, k) < float("inf")]
        if not 0 <= self.batch_wait_s < float("inf"):
            bad.append("batch_wait_s")
        if bad:
            raise ValueError(
                f"server limits must be positive and finite (batch wait >= 0), got {sorted(bad)}"
            )


def png_size(head: bytes) -> tuple[int, int]:
    """(width, height) from the first 24 bytes of a PNG; ValueError when they are not a PNG's."""
    if len(head) < _IHDR_END or not head.startswith(PNG_SIGNATURE) or head[12:16] != b"IHDR":
        raise ValueError("not a PNG (no PNG signature and IHDR chunk)")
    width, height = struct.unpack(">II", head[16:24])
    return width, height


def _png_pixels(items: list[Any]) -> int:
    total = 0
    for i, item in enumerate(items):
        if not isinstance(item, str):
            return 0  # not base64: decode_images names the problem (400)
        try:
            head = base64.b64decode(item[:_IHDR_B64_CHARS], validate=True)
        except binascii.Error as exc:
            raise PayloadError(f"images.data[{i}] is not valid base64: {exc}") from exc
        try:
            width, height = png_size(head)
        except ValueError as exc:
            raise PayloadError(f"images.data[{i}] is not a readable image: {exc}") from exc
        total += width * height
    return total


def check_payload(payload: dict[str, Any], limits: Limits) -> None:
    """Count and decoded pixels of a ``/score`` body against ``limits``, without decoding images.
    LimitError (413) when over; PayloadError (400) for a PNG whose header is unreadable; shapes that
    are malformed are left to ``decode_images``."""
    prompts, images = payload.get("prompts"), payload.get("images")
    images = images if isinstance(images, dict) else {}
    shape, data = images.get("shape"), images.get("data")
    if images.get("format") == "png" and isinstance(data, list):
        count, pixels = len(data), None
    elif isinstance(shape, list) and len(shape) == 4 and all(isinstance(s, int) for s in shape):
        count, pixels = shape[0], shape[0] * shape[2] * shape[3]
    else:
        count, pixels = 0, 0
    count = max(count, len(prompts) if isinstance(prompts, list) else 0)
    if count > limits.max_images:
        raise LimitError(f"{count} images exceed this server's limit of {limits.max_images} per request")
    if pixels is None:
        pixels = _png_pixels(data)
    if pixels > limits.max_pixels:
        raise LimitError(
            f"{count} images of {pixels:,} pixels in all exceed this server's limit of "
            f"{limits.max_pixels:,} decoded pixels per request; send fewer or smaller images"
        )


class ReadDeadlineProtocol(H11Protocol):
    """Closes a connection that has not delivered a whole request ``read_timeout_s`` after it
    opened or after its last answer; the clock stops while the request is being answered."""

    read_timeout_s = 30.0  # set per server by ``protocol_with_deadline``

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._deadline: asyncio.TimerHandle | None = None
        self._arm()

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(self.read_timeout_s, self._expire)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expire(self) -> None:
        self._deadline = None
        if self.conn.their_state is not h11.DONE and not self.transport.is_closing():
            self.logger.info("dropped %s: no whole request within %.1fs", self.client, self.read_timeout_s)
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is h11.DONE:
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)


def protocol_with_deadline(read_timeout_s: float) -> type[ReadDeadlineProtocol]:
    """A ``ReadDeadlineProtocol`` class for one server (uvicorn builds the protocol from a class)."""
    return type("ReadDeadlineProtocol", (ReadDeadlineProtocol,), {"read_timeout_s": read_timeout_s})
