"""Prompt sets (placeholder until the prompt-set module lands): built-in digits prompts."""

from __future__ import annotations

DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def digits_prompts() -> list[str]:
    out = []
    for d, w in enumerate(DIGIT_WORDS):
        out += [f"a handwritten digit {d}", f"the number {w}", f"a {w}", f"digit {w}"]
    return out


def load_train_eval(source: str, eval_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    if source != "digits":
        raise ValueError(f"prompt source {source!r} not available yet")
    prompts = digits_prompts()
    n_eval = int(len(prompts) * eval_fraction)
    return prompts[n_eval:], prompts[:n_eval]
