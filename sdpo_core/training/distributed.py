"""What the processes of one launch share about training: the epoch's metrics, over every rank.

Each process trains on its own share of the epoch's samples (the same number on every rank), so its
loss and diagnostics are means over its share only. :func:`gathered_metrics` gives every rank the
epoch's metrics over all of them (what the metrics file, MLflow and the log line show, and what the
callbacks see): the mean over ranks of each value, which is the mean over all samples since the
shares are equal, and the maximum of the ``time/*`` values (an epoch lasts as long as its slowest
process). Reward statistics are gathered before this (``rollout.py``) and grad norms are of the
averaged gradient, so those are the same on every rank already.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math

import torch

from sdpo_core.rundir import ranks

log = logging.getLogger(__name__)
SLOWEST = "time/"  # keys with this prefix: the maximum over ranks, not the mean


def combine_rank_metrics(per_rank: list[dict[str, float]]) -> dict[str, float]:
    """One metrics dict from R ranks' dicts (rank order): per key, the mean over the ranks that have
    it (an exactly rounded sum; equal values on every rank give that value back, bit for bit), or the
    maximum for ``time/*`` keys. Keys keep rank 0's order, then any others in order of appearance.

    e.g. [{"loss": 1.0, "time/epoch": 2.0}, {"loss": 2.0, "time/epoch": 3.0}]
      -> {"loss": 1.5, "time/epoch": 3.0}
    """
    keys = list(dict.fromkeys(k for metrics in per_rank for k in metrics))
    out: dict[str, float] = {}
    for key in keys:
        values = [float(m[key]) for m in per_rank if key in m]
        if key.startswith(SLOWEST):
            out[key] = max(values)
        elif all(v == values[0] for v in values):  # the same on every rank (e.g. grad_norm): no rounding
            out[key] = values[0]
        else:
            out[key] = math.fsum(values) / len(values)
    return out


def gathered_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """This rank's epoch ``metrics`` combined with every other rank's (a collective: every rank calls it)."""
    if not ranks.launched():
        return metrics
    # `sdpo -v`: what each rank measured on its own share, before the gathering
    log.debug("rank %d: epoch metrics of this rank %s", ranks.rank(), json.dumps(metrics))
    return combine_rank_metrics(ranks.gather(metrics))


def weights_digest(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 of a state dict's names, dtypes, shapes and bytes (sorted by name): equal digests are
    bit-identical weights. What each rank logs at the end of training (``-v``), and what a
    checkpoint's weights can be compared with."""
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().to("cpu").contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
