"""Dense rewards from three queries per trajectory (SDPO paper, section 4.2).

Only three predicted-clean states x0 are decoded and scored: the first step, the last step and
an *anchor* step, the one least similar to both ends (argmin over steps of cos(x0_t, x0_first) +
cos(x0_t, x0_last)). Every other step's reward is the similarity-weighted mix of the three
measured rewards; the queried steps keep their measured reward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# below this |sum of similarity weights| a predicted step reward is a division by ~0
MIN_WEIGHT_SUM = 1e-6


def similarities(x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Anchor step and cosine similarities of every step to the first, anchor and last x0.

    Args:
        x0: (N, T, C, H, W) predicted clean latents.
    Returns:
        anchor: (N,) long, argmin_t [cos(x0_t, x0_0) + cos(x0_t, x0_{T-1})] (first minimum on ties).
        sims: (N, T, 3) float32, cosine similarity of x0_t to (first, anchor, last).
    """
    flat = x0.flatten(2).float()  # (N, T, D)
    sim_first = F.cosine_similarity(flat, flat[:, :1], dim=-1)
    sim_last = F.cosine_similarity(flat, flat[:, -1:], dim=-1)
    anchor = (sim_first + sim_last).argmin(dim=1)
    anchor_x0 = flat[torch.arange(flat.shape[0]), anchor].unsqueeze(1)
    sim_anchor = F.cosine_similarity(flat, anchor_x0, dim=-1)
    return anchor, torch.stack([sim_first, sim_anchor, sim_last], dim=-1)


def query_steps(anchor: torch.Tensor, num_steps: int) -> torch.Tensor:
    """(N,) anchor -> (N, 3) long step indices to decode and score: first, anchor, last."""
    first = torch.zeros_like(anchor)
    last = torch.full_like(anchor, num_steps - 1)
    return torch.stack([first, anchor, last], dim=1)


def drop_unused_queries(steps: torch.Tensor, use_anchor: bool = True, dense: bool = True) -> torch.Tensor:
    """(N, 3) query steps (first, anchor, last) -> (N, 3) with each column that
    :func:`predict_dense_rewards` leaves unused pointed at a used step: the anchor at the first step
    when ``use_anchor`` is False, the first and the anchor at the last when ``dense`` is False. The
    scorer scores each distinct (trajectory, step) once, so this makes 2 or 1 reward queries per
    trajectory instead of 3; the dense rewards are those of the full query."""
    steps = steps.clone()
    if not dense:
        steps[:, 0] = steps[:, 1] = steps[:, 2]
    elif not use_anchor:
        steps[:, 1] = steps[:, 0]
    return steps


def predict_dense_rewards(
    rewards_queried: torch.Tensor,
    sims: torch.Tensor,
    anchor: torch.Tensor,
    use_anchor: bool = True,
    dense: bool = True,
) -> torch.Tensor:
    """Reward at every step from the three measured ones.

    Args:
        rewards_queried: (N, 3) measured rewards of x0 at (first, anchor, last).
        sims: (N, T, 3) from :func:`similarities`; anchor: (N,) anchor step.
        use_anchor: ablation; False mixes first and last only.
        dense: ablation; False gives every step the final reward (DDPO-style sparse signal).
    Returns:
        rewards_dense: (N, T) float32, r_t = sum_k s_tk r_k / sum_k s_tk over the queried k,
        with the measured values kept at the queried steps.
    """
    r = rewards_queried.float()
    n, t = sims.shape[:2]
    if not dense:
        return r[:, 2:3].expand(n, t).clone()
    w = sims.float()
    if not use_anchor:
        w = w * torch.tensor([1.0, 0.0, 1.0], device=w.device)
    denom = w.sum(-1)
    dense_r = (w * r[:, None, :]).sum(-1) / denom
    # cosine similarities can be negative: a step whose weights sum to ~0 has no usable prediction
    bad = ~torch.isfinite(dense_r) | (denom.abs() < MIN_WEIGHT_SUM)
    bad[:, 0] = bad[:, -1] = False  # overwritten by measured values below
    if use_anchor:
        bad[torch.arange(n, device=r.device), anchor] = False
    if bool(bad.any()):
        raise ValueError(
            f"dense rewards are not finite at {int(bad.sum())} of {n * t} (trajectory, step) entries: the "
            f"similarity weights of those steps sum to {float(denom[bad].abs().min()):.3g} (~0); "
            "set train.dense_reward=false or check the measured rewards for NaN / inf"
        )
    rows = torch.arange(n, device=r.device)
    dense_r[:, 0] = r[:, 0]
    dense_r[:, -1] = r[:, 2]
    if use_anchor:  # written last, as the paper's code does (equal anyway for a deterministic reward)
        dense_r[rows, anchor] = r[:, 1]
    return dense_r
