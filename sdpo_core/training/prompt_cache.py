"""Prompt embeddings computed once per run (``model.cache_prompt_embeddings``).

The training prompt set is fixed for a run, so every prompt's conditioning is encoded once, before
the first epoch, in batches of ``sample.batch_size`` (the size the rollout encodes them in), and
the text encoders are then freed: moved to the ``meta`` device, so that they hold no memory on the
training device (T5-XXL is ~10 GB in bf16) and any later use of them fails loudly instead of
silently re-encoding.
"""

from __future__ import annotations

from typing import Any

import torch

from sdpo_core.families.family import Conditioning


class PromptEmbeddings:
    """prompt -> its Conditioning row (1 row each, on the device the family encodes on)."""

    def __init__(self, family: Any, prompts: list[str], batch_size: int) -> None:
        distinct = list(dict.fromkeys(prompts))
        self.rows: dict[str, Conditioning] = {}
        for i in range(0, len(distinct), batch_size):
            chunk = distinct[i:i + batch_size]
            cond = family.encode(chunk)
            self.rows.update({p: cond[j] for j, p in enumerate(chunk)})

    def __call__(self, prompts: list[str]) -> Conditioning:
        """N prompts -> Conditioning of N rows (as ``family.encode`` returns them)."""
        missing = sorted({p for p in prompts if p not in self.rows})
        if missing:
            raise KeyError(f"prompts not in the cached training set: {missing[:3]}")
        return Conditioning.cat([self.rows[p] for p in prompts])


def free_text_encoders(pipe: Any) -> list[str]:
    """Move every text encoder of the pipeline to ``meta`` (its memory freed); returns their names."""
    names = [n for n, m in pipe.components.items() if n.startswith("text_encoder") and isinstance(m, torch.nn.Module)]
    for name in names:
        getattr(pipe, name).to("meta")
    return names
