"""DiffusionNFT (Zheng et al. 2025, "DiffusionNFT: Online Diffusion Reinforcement with Forward Process";
NVlabs/DiffusionNFT ``scripts/train_nft_sd3.py``): policy optimisation on the forward process.

What it does, as the paper's script does it (its line numbers at commit 24af555):
  * sampling: the family's own sampler, with the OLD policy (the script switches to its "old" LoRA
    adapter to sample, l. 640); log-probs are not used. One reward query per trajectory: its final x0.
  * rewards -> r: advantages are the reward minus its prompt group's mean over the std of the whole
    epoch's rewards (Flow-GRPO's per-prompt tracker with ``global_std``, l. 750; ``train.nft.std``), then
    r = clamp(clip(A, +-c) / c / 2 + 1/2, 0, 1) with c = ``train.adv_clip_max`` (l. 910-929), per item.
  * the loss at a forward-noised x_t of the sampled clean latent x0, at step indices drawn per item from
    the sampler's own schedule (the script permutes ``scheduler.timesteps`` per sample and trains on
    ``timestep_fraction`` of them, l. 810-864: here ``train.timestep_fraction`` and the step-shuffled
    work order), with fresh noise per (item, step):
        x0+ = (1 - beta) x0_old + beta x0_theta,  x0- = (1 + beta) x0_old - beta x0_theta
        loss = adv_clip_max * mean_i [r e(x0+) + (1 - r) e(x0-)] / beta       (l. 934-960)
    e: squared error to x0 over the detached mean absolute error (adaptive weighting, l. 940-957).
  * the paper's KL term: ``train.nft.kl_weight`` x mean (f_theta - f_ref)^2 on the denoiser outputs, the
    reference being the weights training started from (the script disables the adapter: the base
    model, which a fresh LoRA, B = 0, equals exactly) (l. 966-970).
  * the old policy: a copy of the trained weights, equal to them at the start (l. 576-579), moved after
    every epoch's updates as old <- d old + (1 - d) current with d = min(rate (step - delay), max) at
    optimizer step ``step`` (``return_decay``, l. 169-189 and 1034-1039): an EMA whose decay grows
    from 0 (a copy per epoch) to ``train.nft.old_decay_max``.

Parameterisations. Write the forward process as x_t = a x0 + s eps: DDPM schedules (DDIM, LCM) have
a = sqrt(abar_t), s = sqrt(1 - abar_t); rectified flow has a = 1 - sigma, s = sigma. Whatever the network
f predicts, its clean-latent estimate at a fixed x_t is affine in f:
    flow velocity (v* = eps - x0):  x0(f) = x_t - sigma f
    epsilon (f* = eps):             x0(f) = (x_t - s f) / a
    v-prediction (f* = a eps - s x0): x0(f) = a x_t - s f
    sample (f* = x0):               x0(f) = f
    LCM (boundary condition):       c_out x0(f) + c_skip x_t with x0(f) one of the above
i.e. x0(f) = A(x_t) + B f with a per-item scalar B (-sigma, -s/a, -s, 1, ...), and x0(f*) = x0.
  1. Mixing is linear in f and its weights sum to 1, so it commutes with x0(.):
        x0((1 - beta) f_old + beta f_theta) = (1 - beta) x0(f_old) + beta x0(f_theta),
     and the same for (1 + beta, -beta). The implicit positive and negative policies are the same
     models whether mixed on velocities, epsilons or clean latents: we mix the sampler's x0
     (``Sampler.transition(...).x0``), which every family and sampler provides.
  2. x0(f) - x0 = B (f - f*): the x0-space error is the output-space error scaled by B. For a flow
     model B = -sigma, so e(x0+) = sigma^2 |v+ - (eps - x0)|^2 (the velocity form, weighted by sigma^2),
     which is the paper's loss exactly (its script computes ``xt - t * v`` and the error to x0). For an
     epsilon UNet (SD-Turbo, SDXL-Turbo, LCM) B = -sqrt((1 - abar_t) / abar_t): e(x0+) =
     (1 - abar_t) / abar_t |eps+ - eps|^2, the epsilon loss weighted by 1 / SNR(t). With the adaptive
     weight (the detached mean |x0(f) - x0| = |B| mean |f - f*|) the loss is |B| |f - f*|^2 / mean |f - f*|.
  3. Forward noising uses the sampler's own schedule (``Sampler.add_noise``: abar at the step's
     timestep for DDIM / LCM, sigma for flow), at the step's timestep the denoiser is told.
"""

from __future__ import annotations

from typing import Any

import torch

from sdpo_core.methods.grpo import GRPO
from sdpo_core.methods.method import OLD, REFERENCE, TrainingContext
from sdpo_core.rl.nft import nft_loss, old_policy_decay, optimality_probability, output_distance


class NFT(GRPO):
    """GRPO's prompt groups and group-normalised final rewards (``train.nft.group_size``, ``std``) and
    DDPO's update loop; DiffusionNFT's old policy, sampling and forward-process loss."""

    name = "nft"
    uses_log_probs = False
    sampling_policy = OLD

    @classmethod
    def groups(cls, train: Any) -> Any:
        return train.nft

    @classmethod
    def check_batches(cls, train: Any, sample: Any) -> None:
        """GRPO's group checks on ``train.nft``; and ``train.kl_beta`` (a transition KL) is not nft's."""
        super().check_batches(train, sample)
        if train.kl_beta > 0:
            raise ValueError(
                f"train.kl_beta={train.kl_beta} is the per-step Gaussian KL of sdpo, ddpo and grpo; nft's KL "
                "term is train.nft.kl_weight: set train.kl_beta=0 and use train.nft.kl_weight"
            )

    def policies(self) -> tuple[str, ...]:
        return (OLD, REFERENCE) if self.train.nft.kl_weight > 0 else (OLD,)

    def snapshot_updates(self, global_step: int) -> dict[str, float]:
        n = self.train.nft
        return {
            OLD: 1.0 - old_policy_decay(global_step, n.old_decay_delay, n.old_decay_rate, n.old_decay_max)
        }

    def loss(self, log_probs_new, log_probs_old, advantages, weights):
        raise TypeError("nft has no log-prob loss: it trains through batch_loss on the forward process")

    def batch_loss(
        self, ctx: TrainingContext, s: Any, rows: torch.Tensor, steps: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss of items ``rows`` (b,) forward-noised to step indices ``steps`` (b,)."""
        n, dev = self.train.nft, ctx.device
        x0 = s.x0_final[0][rows].to(dev)  # (b, C, H, W): the clean latents the final reward scored
        cond = s.cond[rows].to(dev)
        x_t = ctx.sampler.add_noise(x0, ctx.noise_like(x0), steps)
        with (
            torch.no_grad()
        ):  # the copies' forwards first: the live weights are back before the graph is built
            out_old = ctx.output(x_t, steps, cond, OLD)
            out_ref = ctx.output(x_t, steps, cond, REFERENCE) if n.kl_weight > 0 else None
        out = ctx.output(x_t, steps, cond)
        x0_new = ctx.sampler.transition(out, steps, x_t).x0
        x0_old = ctx.sampler.transition(out_old, steps, x_t).x0
        r = optimality_probability(s.advantages[0][rows, steps].to(dev), self.train.adv_clip_max)
        loss, diag = nft_loss(x0_new, x0_old, x0, r, n.beta, n.adaptive_weight)
        loss = (
            loss * self.train.adv_clip_max
        )  # the script's scale: policy_loss = ori_policy_loss * adv_clip_max
        diag["nft/old_deviation"] = (out.detach().float() - out_old.float()).pow(2).mean()
        if out_ref is not None:
            kl = output_distance(out, out_ref)
            loss = loss + n.kl_weight * kl
            diag["kl_ref"] = kl.detach()
        return loss, diag
