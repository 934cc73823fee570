"""A small CLIP BPE tokenizer built in code (no download).

CLIP's BPE splits a word into characters, the last one carrying ``</w>``, then applies merges
by rank. For each known word we add the merges that rebuild it left to right, so every known
word becomes one token; unknown words fall back to single characters (all of a-z, 0-9 and
common punctuation are in the vocabulary).
"""

from __future__ import annotations

import json
import string
from pathlib import Path

from transformers import CLIPTokenizer

SPECIALS = ["<|startoftext|>", "<|endoftext|>"]
CHARS = list(string.ascii_lowercase + string.digits + ".,!?'-:;()&/\"")


def _word_merges(word: str) -> list[tuple[str, str]]:
    symbols = list(word[:-1]) + [word[-1] + "</w>"]
    merges, current = [], symbols[0]
    for sym in symbols[1:]:
        merges.append((current, sym))
        current = current + sym
    return merges


def write_tokenizer_files(words: list[str], out_dir: str | Path) -> Path:
    """Write ``vocab.json`` and ``merges.txt`` for ``words`` into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab: dict[str, int] = {}
    for tok in CHARS + [c + "</w>" for c in CHARS]:
        vocab.setdefault(tok, len(vocab))
    merges: list[tuple[str, str]] = []
    for word in sorted({w.lower() for w in words if w}):
        if len(word) < 2:
            continue
        for a, b in _word_merges(word):
            if (a, b) not in merges:
                merges.append((a, b))
            vocab.setdefault(a + b, len(vocab))
    for tok in SPECIALS:
        vocab.setdefault(tok, len(vocab))
    (out / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (out / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out


def build_tokenizer(words: list[str], work_dir: str | Path, max_length: int = 32) -> CLIPTokenizer:
    """A CLIPTokenizer whose vocabulary knows ``words`` as single tokens."""
    path = write_tokenizer_files(words, work_dir)
    return CLIPTokenizer.from_pretrained(str(path), model_max_length=max_length, pad_token="<|endoftext|>")
