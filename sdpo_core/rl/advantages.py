"""Returns and per-step, per-prompt advantage normalisation (SDPO paper, section 4.3).

``PerStepPromptStatTracker`` keeps, for every (prompt, step), the last ``buffer_size`` returns
seen across epochs in a ring buffer tensor of shape (P, T, K). Advantages are
(return - mean) / (std + 1e-6) over that buffer once a prompt has ``min_count`` values, and over
the whole batch's returns at that step before. All of it is tensor arithmetic: no Python loop
over prompts or steps (the only per-prompt work is the dict that maps a prompt string to a row).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

EPS = 1e-6


def discounted_returns(rewards: torch.Tensor, gamma: float) -> torch.Tensor:
    """R_t = sum_{k>=t} gamma^(k-t) r_k.

    Args:
        rewards: (N, T) dense rewards, step 0 = first denoising step.
    Returns:
        (N, T) float32 returns.
    """
    t = rewards.shape[1]
    idx = torch.arange(t, dtype=torch.float64)
    power = idx[None, :] - idx[:, None]  # (T, T): k - t
    discount = torch.where(power >= 0, torch.as_tensor(gamma, dtype=torch.float64) ** power, 0.0)
    return (rewards.double() @ discount.T).float()


def batch_normalise(values: torch.Tensor) -> torch.Tensor:
    """(N, T) -> per-step (values - mean) / (std + eps) over the batch (population std)."""
    v = values.double()
    return ((v - v.mean(0)) / (v.std(0, unbiased=False) + EPS)).float()


def group_normalise(prompts: list[str], values: torch.Tensor, std: str = "batch") -> torch.Tensor:
    """GRPO's advantages: (value - mean of its prompt's group) / (std + eps), per column.

    Groups are the items of the same prompt string in this batch (no history across epochs).
    ``std="batch"``: one std over all items (Flow-GRPO's ``global_std``); ``"group"``: the
    group's own std (population std in both). values: (N, K) -> (N, K) float32.
    """
    if values.shape[0] != len(prompts):
        raise ValueError(f"{values.shape[0]} values for {len(prompts)} prompts")
    v = values.detach().cpu().double()
    _, group = np.unique(np.array(prompts, dtype=object), return_inverse=True)
    g = torch.as_tensor(group.reshape(-1), dtype=torch.long)
    n_groups = int(g.max()) + 1 if len(g) else 0
    count = torch.bincount(g, minlength=n_groups).double()[:, None]  # (G, 1)
    total = torch.zeros(n_groups, v.shape[1], dtype=torch.float64).index_add_(0, g, v)
    mean = total / count
    centred = v - mean[g]
    if std == "batch":
        sd = v.std(0, unbiased=False, keepdim=True)
    elif std == "group":
        var = torch.zeros_like(total).index_add_(0, g, centred**2) / count
        sd = var.sqrt()[g]
    else:
        raise ValueError(f"std must be 'batch' or 'group', got {std!r}")
    return (centred / (sd + EPS)).float()


class PerStepPromptStatTracker:
    """Running per-(prompt, step) mean and std over the last ``buffer_size`` values."""

    def __init__(self, buffer_size: int, min_count: int, num_steps: int):
        if min_count > buffer_size:
            raise ValueError(f"min_count {min_count} > buffer_size {buffer_size}")
        self.buffer_size, self.min_count, self.num_steps = buffer_size, min_count, num_steps
        self.prompt_index: dict[str, int] = {}
        self.buffer = torch.zeros(0, num_steps, buffer_size, dtype=torch.float64)  # (P, T, K)
        self.count = torch.zeros(0, dtype=torch.long)  # (P,) values held (<= K)
        self.cursor = torch.zeros(0, dtype=torch.long)  # (P,) next slot to write

    def _rows(self, prompts: list[str]) -> torch.Tensor:
        new = [p for p in dict.fromkeys(prompts) if p not in self.prompt_index]
        if new:
            start = len(self.prompt_index)
            self.prompt_index.update({p: start + i for i, p in enumerate(new)})
            k, t = self.buffer_size, self.num_steps
            self.buffer = torch.cat([self.buffer, torch.zeros(len(new), t, k, dtype=torch.float64)])
            self.count = torch.cat([self.count, torch.zeros(len(new), dtype=torch.long)])
            self.cursor = torch.cat([self.cursor, torch.zeros(len(new), dtype=torch.long)])
        return torch.tensor([self.prompt_index[p] for p in prompts], dtype=torch.long)

    def update(self, prompts: list[str], returns: torch.Tensor) -> torch.Tensor:
        """Add a batch and return its advantages.

        Args:
            prompts: N prompt strings (repeats allowed); returns: (N, T).
        Returns:
            advantages: (N, T) float32.
        """
        if returns.shape != (len(prompts), self.num_steps):
            raise ValueError(f"returns {tuple(returns.shape)} != ({len(prompts)}, {self.num_steps})")
        values = returns.detach().cpu().double()
        rows = self._rows(prompts)
        k = self.buffer_size
        # rank of each item among the batch's items of the same prompt, in batch order
        order = torch.argsort(rows, stable=True)
        sorted_rows = rows[order]
        starts = torch.searchsorted(sorted_rows, sorted_rows, side="left")
        rank = torch.empty_like(rows)
        rank[order] = torch.arange(len(rows)) - starts
        per_prompt = torch.bincount(rows, minlength=len(self.count))  # (P,)
        # a prompt seen m > K times in one batch keeps its last K values: older ones would be
        # overwritten in the ring anyway, and dropping them keeps scatter indices unique.
        keep = rank >= per_prompt[rows] - k
        slot = (self.cursor[rows] + rank) % k
        r, s, v = rows[keep], slot[keep], values[keep]  # v: (M, T)
        steps = torch.arange(self.num_steps)
        self.buffer[r[:, None], steps[None, :], s[:, None]] = v
        self.cursor = (self.cursor + per_prompt) % k
        self.count = torch.clamp(self.count + per_prompt, max=k)
        # statistics over each row's valid slots (slots fill 0..K-1 before the ring wraps)
        valid = (torch.arange(k)[None, :] < self.count[:, None]).double()  # (P, K)
        n = valid.sum(1).clamp(min=1)[:, None]  # (P, 1)
        mean = (self.buffer * valid[:, None, :]).sum(-1) / n  # (P, T)
        var = (((self.buffer - mean[..., None]) ** 2) * valid[:, None, :]).sum(-1) / n
        std = var.sqrt()
        batch_mean = values.mean(0, keepdim=True)
        batch_std = values.std(0, unbiased=False, keepdim=True)
        use_buffer = (self.count[rows] >= self.min_count)[:, None]  # (N, 1)
        mu = torch.where(use_buffer, mean[rows], batch_mean)
        sd = torch.where(use_buffer, std[rows], batch_std)
        return ((values - mu) / (sd + EPS)).float()

    def stats(self) -> dict[str, float]:
        return {"tracked_prompts": float(len(self.prompt_index)), "mean_count": float(self.count.float().mean())
                if len(self.count) else 0.0}

    def state_dict(self) -> dict[str, Any]:
        prompts = sorted(self.prompt_index, key=self.prompt_index.__getitem__)
        return {
            "prompts": prompts,
            "buffer": self.buffer.clone(),
            "count": self.count.clone(),
            "cursor": self.cursor.clone(),
            "buffer_size": self.buffer_size,
            "min_count": self.min_count,
            "num_steps": self.num_steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if (state["buffer_size"], state["num_steps"]) != (self.buffer_size, self.num_steps):
            raise ValueError(
                f"stat tracker state has buffer_size={state['buffer_size']}, num_steps={state['num_steps']}; "
                f"this run uses {self.buffer_size}, {self.num_steps}"
            )
        self.prompt_index = {p: i for i, p in enumerate(state["prompts"])}
        self.buffer = state["buffer"].clone().double()
        self.count = state["count"].clone().long()
        self.cursor = state["cursor"].clone().long()


def reference_per_prompt_advantages(
    prompts: list[str], returns: np.ndarray, history: dict, buffer_size: int, min_count: int
) -> np.ndarray:
    """Straightforward per-prompt, per-step loop (the paper code's algorithm), for tests and
    benchmarks only. ``history`` maps (prompt, step) -> list of past values and is updated."""
    prompts_arr = np.array(prompts)
    adv = np.empty_like(returns, dtype=np.float64)
    for prompt in np.unique(prompts_arr):
        mask = prompts_arr == prompt
        for step in range(returns.shape[1]):
            buf = history.setdefault((prompt, step), [])
            buf.extend(returns[mask, step].tolist())
            del buf[:-buffer_size]
            if len(buf) < min_count:
                mean, std = returns[:, step].mean(), returns[:, step].std()
            else:
                mean, std = np.mean(buf), np.std(buf)
            adv[mask, step] = (returns[mask, step] - mean) / (std + EPS)
    return adv
