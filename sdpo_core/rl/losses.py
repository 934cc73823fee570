"""SDPO's dense reward difference loss, the DDPO (PPO-clip) baseline loss and the per-step Gaussian KL.

All inputs are per-item values at one denoising step; everything is computed in float32 even
under autocast, because log-ratios of ~1e-4 vanish in half precision.
"""

from __future__ import annotations

import torch


def temporal_weights(num_steps: int, lam: float, log_scale: float) -> torch.Tensor:
    """w_t = lam^t / log_scale for t = 0..T-1 (step 0 = first denoising step); shape (T,).

    SDPO paper section 4.3 (temporal importance weight)."""
    return torch.as_tensor(lam, dtype=torch.float32) ** torch.arange(num_steps, dtype=torch.float32) / log_scale


def sdpo_loss(
    log_probs_new1: torch.Tensor,
    log_probs_old1: torch.Tensor,
    log_probs_new2: torch.Tensor,
    log_probs_old2: torch.Tensor,
    advantages1: torch.Tensor,
    advantages2: torch.Tensor,
    weights: torch.Tensor,
    clip_range: float,
    adv_clip_max: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Dense reward difference loss for B pairs at one step each.

    d = w * [(logp1 - logp1_old) - (logp2 - logp2_old)];  loss = mean((d - (A1 - A2))^2),
    and with ``clip_range > 0`` the log-probs are also clamped to old +- clip_range and the
    element-wise max of the unclipped and clipped squared errors is taken (paper eq. 12-13).

    Args:
        log_probs_*: (B,) log-probs of trajectory 1 / 2 under the current (new) and sampling
            (old) policy; advantages*: (B,) unclipped advantages; weights: (B,) w_t per item.
    Returns:
        loss (scalar) and diagnostics: clipfrac, adv_clipfrac, approx_kl, log_ratio_diff.
    """
    lp1, lo1 = log_probs_new1.float(), log_probs_old1.float()
    lp2, lo2 = log_probs_new2.float(), log_probs_old2.float()
    a1 = advantages1.float().clamp(-adv_clip_max, adv_clip_max)
    a2 = advantages2.float().clamp(-adv_clip_max, adv_clip_max)
    target = a1 - a2
    w = weights.float()
    diff = (lp1 - lo1) - (lp2 - lo2)
    loss_unclipped = (w * diff - target) ** 2
    if clip_range > 0:
        c1 = torch.clamp(lp1, lo1 - clip_range, lo1 + clip_range)
        c2 = torch.clamp(lp2, lo2 - clip_range, lo2 + clip_range)
        loss_clipped = (w * ((c1 - lo1) - (c2 - lo2)) - target) ** 2
        per_item = torch.maximum(loss_unclipped, loss_clipped)
        clipfrac = (loss_clipped > loss_unclipped).float().mean()
    else:
        per_item = loss_unclipped
        clipfrac = torch.zeros(())
    adv_clipfrac = (
        (advantages1.abs() > adv_clip_max).float().mean() + (advantages2.abs() > adv_clip_max).float().mean()
    ) / 2
    approx_kl = 0.25 * (((lp1 - lo1) ** 2).mean() + ((lp2 - lo2) ** 2).mean())
    info = {
        "clipfrac": clipfrac.detach(),
        "adv_clipfrac": adv_clipfrac.detach(),
        "approx_kl": approx_kl.detach(),
        "log_ratio_diff": diff.abs().mean().detach(),
    }
    return per_item.mean(), info


def ddpo_loss(
    log_probs_new: torch.Tensor,
    log_probs_old: torch.Tensor,
    advantages: torch.Tensor,
    clip_range: float,
    adv_clip_max: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO-clip on final-reward advantages (DDPO, Black et al. 2023).

    loss = mean(max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps))), ratio = exp(logp - logp_old).

    Args:
        log_probs_new / log_probs_old: (N,); advantages: (N,) unclipped.
    Returns:
        loss (scalar) and diagnostics: clipfrac, adv_clipfrac, approx_kl.
    """
    lp, lo = log_probs_new.float(), log_probs_old.float()
    adv = advantages.float().clamp(-adv_clip_max, adv_clip_max)
    ratio = torch.exp(lp - lo)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    info = {
        "clipfrac": ((ratio - 1.0).abs() > clip_range).float().mean().detach(),
        "adv_clipfrac": (advantages.abs() > adv_clip_max).float().mean().detach(),
        "approx_kl": (0.5 * ((lp - lo) ** 2).mean()).detach(),
    }
    return loss, info


def gaussian_kl(mean_p: torch.Tensor, mean_q: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Per-step KL(N(mean_p, std^2 I) || N(mean_q, std^2 I)) per latent dimension, averaged over C, H, W.

    Two Gaussians with one std: KL = sum_d (mean_p,d - mean_q,d)^2 / (2 std^2); averaged over the
    dimensions (not summed), as the log-probs are (``samplers.common.gaussian_log_prob``) and as
    Flow-GRPO's KL term is (``((mean - mean_ref)^2).mean(dims) / (2 std^2)``). A step with std 0 (a
    deterministic one) has no distribution to compare: 0 for it, as its log-prob is 0.

    Args:
        mean_p: (N, C, H, W) the current policy's step mean (gradients flow through it);
        mean_q: (N, C, H, W) the reference policy's; std: (N, 1, 1, 1) or broadcastable, the step's std.
    Returns:
        (N,) float32.
    """
    std = std.float()
    safe = torch.where(std > 0, std, torch.ones_like(std))
    kl = (mean_p.float() - mean_q.float()).pow(2) / (2 * safe**2)
    kl = torch.where(std > 0, kl, torch.zeros_like(kl))
    return kl.mean(dim=tuple(range(1, kl.ndim)))
