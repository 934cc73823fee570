"""DiffusionNFT's maths (Zheng et al. 2025, "DiffusionNFT: Online Diffusion Reinforcement with Forward
Process"; NVlabs/DiffusionNFT ``scripts/train_nft_sd3.py``): the reward as an optimality probability,
the implicit positive / negative policy loss and the old policy's decay schedule.

The loss is written on predicted clean latents x0_hat, which every denoiser parameterisation gives as
an affine function of its output at a fixed x_t (``methods/nft.py`` has the derivation). All in float32.
"""

from __future__ import annotations

import torch

# floor of the adaptive weight (the paper's clip(min=1e-5)): an item already at its target keeps a finite loss
MIN_WEIGHT = 1e-5


def optimality_probability(advantages: torch.Tensor, adv_clip_max: float) -> torch.Tensor:
    """Advantages -> the optimality probability r in [0, 1] that weighs the positive policy.

    r = clamp(clip(A, -c, c) / c / 2 + 1/2, 0, 1) with c = ``adv_clip_max``: A = 0 (a reward at its
    group's mean) is r = 1/2, A >= c is r = 1 and A <= -c is r = 0 (the paper's script, the lines after
    ``# normalize advantage``). advantages: (N,) -> (N,) float32.
    """
    a = advantages.float().clamp(-adv_clip_max, adv_clip_max)
    return (a / adv_clip_max / 2 + 0.5).clamp(0.0, 1.0)


def _weighted_error(x0_hat: torch.Tensor, x0: torch.Tensor, adaptive: bool) -> torch.Tensor:
    """(b,) mean squared error over C, H, W, divided (adaptive) by the detached mean absolute error."""
    dims = tuple(range(1, x0.ndim))
    err = (x0_hat - x0).pow(2).mean(dim=dims)
    if not adaptive:
        return err
    weight = (x0_hat - x0).detach().abs().mean(dim=dims).clamp(min=MIN_WEIGHT)
    return err / weight


def nft_loss(
    x0_new: torch.Tensor,
    x0_old: torch.Tensor,
    x0: torch.Tensor,
    r: torch.Tensor,
    beta: float,
    adaptive_weight: bool = True,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DiffusionNFT's policy loss for b items at one forward-noised state each.

    The implicit policies mix the current and the old prediction (paper eq. 8, the script's
    ``positive_prediction`` / ``implicit_negative_prediction``):

        x0+ = (1 - beta) x0_old + beta x0_new,   x0- = (1 + beta) x0_old - beta x0_new
        loss_i = [r_i e(x0+_i) + (1 - r_i) e(x0-_i)] / beta

    with e the per-item mean squared error to the sampled clean latent, each divided by its own detached
    mean absolute error when ``adaptive_weight`` (the paper's adaptive weighting). A high-reward item
    (r near 1) pulls x0+ toward its image; a low-reward one pulls x0- toward it, which pushes x0_new away.

    Args:
        x0_new: (b, C, H, W) x0 predicted by the current policy (gradients flow through it).
        x0_old: (b, C, H, W) x0 predicted by the old policy at the same x_t (detached here).
        x0: (b, C, H, W) the clean latents the sampling produced (the forward process started there).
        r: (b,) optimality probabilities in [0, 1]; beta > 0.
    Returns:
        the mean of loss_i (scalar) and diagnostics: nft/positive, nft/negative (mean errors), nft/r.
    """
    new, old, target = x0_new.float(), x0_old.detach().float(), x0.float()
    positive = (1 - beta) * old + beta * new
    negative = (1 + beta) * old - beta * new
    pos = _weighted_error(positive, target, adaptive_weight)
    neg = _weighted_error(negative, target, adaptive_weight)
    r = r.float()
    per_item = (r * pos + (1 - r) * neg) / beta
    info = {
        "nft/positive": pos.mean().detach(),
        "nft/negative": neg.mean().detach(),
        "nft/r": r.mean().detach(),
    }
    return per_item.mean(), info


def old_policy_decay(step: int, delay: int, rate: float, maximum: float) -> float:
    """Decay d of the old policy's update after an epoch, old <- d old + (1 - d) current, at optimizer
    step ``step``: 0 for the first ``delay`` steps, then min(rate (step - delay), maximum) (the paper's
    ``return_decay``; its default schedule is delay 0, rate 0.001, maximum 0.5; 0, 0, 0 makes the old
    policy a copy of the current one at every epoch)."""
    if step < delay:
        return 0.0
    return min(rate * (step - delay), maximum)


def output_distance(out_new: torch.Tensor, out_ref: torch.Tensor) -> torch.Tensor:
    """The paper's KL term to the reference model: mean over items of the mean squared difference of the
    denoiser outputs. out_new (b, C, H, W) with gradients, out_ref (b, C, H, W) -> scalar float32."""
    diff = out_new.float() - out_ref.detach().float()
    return diff.pow(2).mean(dim=tuple(range(1, diff.ndim))).mean()
