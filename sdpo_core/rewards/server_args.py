"""Command-line options of ``sdpo reward-server``: what to serve, where, and its limits."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

import torch
import yaml

from sdpo_core.rewards import RewardError
from sdpo_core.rewards.server_limits import Limits

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_DEFAULT = Limits()


def _port(text: str) -> int:
    if not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"a port is 0..65535, got {text!r}")
    return int(text)


def _positive(kind: type[int] | type[float]):  # noqa: ANN202  (an argparse type)
    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {text!r}") from None
        if not value > 0 or value == float("inf"):
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {text!r}")
        return value

    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The reward-server options, added to ``parser``."""
    parser.add_argument("--reward", required=True, help="registered reward name or module:function")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    parser.add_argument("--port", type=_port, default=8000)
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="reward.options.KEY=VALUE")
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="device of the reward model (default cuda when available)",
    )
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    limits = parser.add_argument_group("limits (beyond them: 413, or 503 when busy)")
    mb = _DEFAULT.max_request_bytes / 2**20
    limits.add_argument(
        "--max-request-mb", type=_positive(float), default=mb, help=f"body size (default {mb:g})"
    )
    limits.add_argument(
        "--max-images",
        type=_positive(int),
        default=_DEFAULT.max_images,
        help=f"images per request (default {_DEFAULT.max_images})",
    )
    limits.add_argument(
        "--max-pixels",
        type=_positive(int),
        default=_DEFAULT.max_pixels,
        help=f"decoded pixels per request, all images (default {_DEFAULT.max_pixels})",
    )
    limits.add_argument(
        "--max-in-flight",
        type=_positive(int),
        default=_DEFAULT.max_in_flight,
        help=f"requests read, queued or scored at once (default {_DEFAULT.max_in_flight})",
    )
    limits.add_argument(
        "--max-batch",
        type=_positive(int),
        default=_DEFAULT.max_batch,
        help=f"images per reward call; 1 scores requests one by one (default {_DEFAULT.max_batch})",
    )
    limits.add_argument(
        "--batch-wait-ms",
        type=float,
        default=_DEFAULT.batch_wait_s * 1000,
        help="how long a request waits for others to share its batch (default %(default)g)",
    )
    limits.add_argument(
        "--read-timeout",
        type=_positive(float),
        default=_DEFAULT.read_timeout_s,
        help="seconds to receive a whole request, headers and body (default %(default)g)",
    )


def limits_from_args(args: argparse.Namespace) -> Limits:
    """The parsed options -> ``Limits`` (ValueError when one is out of range)."""
    return Limits(
        max_request_bytes=int(args.max_request_mb * 2**20),
        max_images=args.max_images,
        max_pixels=args.max_pixels,
        max_in_flight=args.max_in_flight,
        max_batch=args.max_batch,
        batch_wait_s=args.batch_wait_ms / 1000,
        read_timeout_s=args.read_timeout,
    )


def reward_options(sets: Sequence[str]) -> dict[str, Any]:
    """``reward.options.k=v`` overrides -> the options dict (values read as YAML, as ``--set`` is)."""
    options: dict[str, Any] = {}
    for text in sets:
        key, eq, raw = text.partition("=")
        path = key.strip().split(".")
        if not eq or len(path) < 3 or path[:2] != ["reward", "options"] or not all(path):
            raise RewardError(f"--set here takes reward.options.KEY=VALUE only, got {text!r}")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            raise RewardError(f"--set {key}: cannot read value {raw!r}: {exc}") from exc
        node = options
        for part in path[2:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return options
