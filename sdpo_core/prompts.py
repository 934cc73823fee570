"""Prompt sets: load, normalise, de-duplicate, split train/eval, write with a manifest.

A source (``prompts.source``) is one of

* a built-in set: ``digits``, ``simple_animals``, ``complex_animals``;
* a generator ``template:<name>`` (see :data:`GENERATORS`), deterministic;
* a path to a UTF-8 text file, one prompt per line (DVC-tracked: its DVC md5 in the manifest);
* ``s3://...`` or ``http(s)://...`` (``sdpo_core.sources``, fsspec), its version in the manifest;
* a local or remote ``.jsonl`` file: one object per line with a string ``prompt`` (other fields:
  metadata, not part of the prompt).

Built-in names win over a file of the same name; write ``./digits`` for such a file.

Usage::

    split = prepare(cfg.prompts, "runs/digits-tiny/prompts")   # writes train.txt, eval.txt, manifest.json
    split = load_split("runs/digits-tiny/prompts")              # reads them back, checks the hashes
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from importlib import metadata
from importlib.resources import files
from pathlib import Path

from sdpo_core.config import PromptsConfig
from sdpo_core.sources import SourceError, decode, dvc_version, is_remote, read_source

DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
ACTIVITIES = [
    "riding a bike",
    "playing chess",
    "washing the dishes",
    "reading a book",
    "playing the guitar",
    "eating a sandwich",
    "flying a kite",
    "painting a picture",
    "surfing a wave",
    "baking a cake",
]
COLORS = ["red", "blue", "green", "yellow", "purple", "orange", "pink", "white", "black", "golden"]
ASSET_SETS = ["simple_animals", "complex_animals"]
FILES = ("train.txt", "eval.txt")
MANIFEST = "manifest.json"


class PromptError(ValueError):
    """A prompt source or split that cannot be used; the message says which and what was expected."""


@dataclass(frozen=True)
class PromptSet:
    """Cleaned prompts; ``phrasings[i]`` is prompt i's template where the set has them (digits)."""

    source: str
    prompts: list[str]
    raw_count: int
    phrasings: list[str] | None = None
    labels: list[int] | None = None
    version: dict = field(default_factory=dict)  # what identifies the source's content (remote, JSONL)


@dataclass(frozen=True)
class PromptSplit:
    train: list[str]
    eval: list[str]
    manifest: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# Sources


def _article(word: str) -> str:
    """English indefinite article by first sound ("an eight", "a one", "an owl")."""
    return "an" if word[0] in "aeiou" and not word.startswith(("one", "uni", "use")) else "a"


def _asset(name: str) -> list[str]:
    return files("sdpo_core.assets").joinpath(f"{name}.txt").read_text(encoding="utf-8").splitlines()


def digit_prompts() -> list[tuple[str, int]]:
    """(prompt, digit) pairs of the embedded digits model (``sdpo_core.rewards.digits``)."""
    from sdpo_core.rewards.digits import all_digit_prompts

    return [(str(p), int(d)) for p, d in all_digit_prompts()]


def digit_phrasing(prompt: str, digit: int) -> str:
    """The template of a digit prompt: ``"an eight"`` -> ``"a <w>"``, ``"digit 8"`` -> ``"digit <n>"``."""
    text = re.sub(rf"\b{digit}\b", "<n>", prompt.lower())
    text = re.sub(rf"\b{DIGIT_WORDS[digit]}\b", "<w>", text)
    return re.sub(r"\ban? <w>", "a <w>", text)


def _animals_activities() -> list[str]:
    animals = normalise(_asset("simple_animals"))
    return [f"{_article(a)} {a} {act}" for a in animals for act in ACTIVITIES]


def _animals_colors() -> list[str]:
    animals = normalise(_asset("simple_animals"))
    return [f"{_article(c)} {c} {a}" for a in animals for c in COLORS]


GENERATORS: dict[str, Callable[[], list[str]]] = {
    "animals-activities": _animals_activities,
    "animals-colors": _animals_colors,
}


def known_sources() -> list[str]:
    return ["digits", *ASSET_SETS, *(f"template:{g}" for g in GENERATORS)]


def read_prompt_file(path: str | Path) -> list[str]:
    """One prompt per line of a UTF-8 file (a leading BOM is dropped); raw, not yet cleaned."""
    path = Path(path)
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise PromptError(
            f"prompts.source: file '{path}' {what}; expected a UTF-8 text file with one prompt per line, "
            f"or a built-in set ({', '.join(known_sources())})"
        )
    try:
        return decode(path.read_bytes(), f"file {path}").splitlines()
    except SourceError as exc:
        raise PromptError(str(exc)) from None


def _raw_source(source: str) -> tuple[list[str], list[int] | None]:
    if source == "digits":
        pairs = digit_prompts()
        return [p for p, _ in pairs], [d for _, d in pairs]
    if source in ASSET_SETS:
        return _asset(source), None
    if source.startswith("template:"):
        name = source.removeprefix("template:")
        if name not in GENERATORS:
            raise PromptError(
                f"prompts.source: unknown generator '{source}'; known generators: "
                f"{', '.join(f'template:{g}' for g in GENERATORS)}"
            )
        return GENERATORS[name](), None
    if not Path(source).exists() and "/" not in source and "\\" not in source and "." not in source:
        raise PromptError(
            f"prompts.source: '{source}' is neither a built-in prompt set nor an existing file; "
            f"known sets: {', '.join(known_sources())}"
        )
    return read_prompt_file(source), None


# ---------------------------------------------------------------------------------------------
# Cleaning and splitting


def normalise(prompts: Iterable[str]) -> list[str]:
    """Strip, collapse whitespace runs, drop empties and case-insensitive duplicates (first kept)."""
    return [text for text, _ in _dedupe((p, None) for p in prompts)]


def _dedupe(items: Iterable[tuple[str, int | None]]) -> list[tuple[str, int | None]]:
    seen: set[str] = set()
    out = []
    for text, label in items:
        clean = " ".join(text.split())
        key = clean.casefold()
        if clean and key not in seen:
            seen.add(key)
            out.append((clean, label))
    return out


def load_prompt_set(source: str) -> PromptSet:
    """Read ``source`` and clean it; PromptError if nothing is left."""
    builtin = source == "digits" or source in ASSET_SETS or source.startswith("template:")
    try:
        tracked = {} if builtin or is_remote(source) else dvc_version(source)
    except SourceError as exc:
        raise PromptError(str(exc)) from None
    if is_remote(source) or source.endswith(".jsonl"):
        try:
            read = read_source(source)
        except SourceError as exc:
            raise PromptError(str(exc)) from None
        raw, fields = read.lines, read.metadata_fields
        version = {**read.version, **tracked, **({"metadata_fields": fields} if fields else {})}
        prompts = normalise(raw)
        if not prompts:
            raise PromptError(f"prompts.source: '{source}' has no prompts after dropping empty lines and duplicates")
        return PromptSet(source, prompts, len(raw), version=version)
    raw, labels = _raw_source(source)
    items = _dedupe(zip(raw, labels if labels is not None else [None] * len(raw), strict=True))
    if not items:
        raise PromptError(
            f"prompts.source: '{source}' has no prompts after dropping empty lines and duplicates "
            f"({len(raw)} raw lines); expected at least one non-empty line"
        )
    prompts = [p for p, _ in items]
    if labels is None:
        return PromptSet(source, prompts, len(raw), version=tracked)
    digits = [int(d) for _, d in items]  # type: ignore[arg-type]
    phrasings = [digit_phrasing(p, d) for p, d in items]  # type: ignore[arg-type]
    return PromptSet(source, prompts, len(raw), phrasings, digits)


def _check_fraction(eval_fraction: float) -> None:
    if not 0.0 <= eval_fraction < 1.0:
        raise PromptError(f"prompts.eval_fraction: got {eval_fraction!r}, expected a number in [0, 1)")


def _n_held_out(total: int, eval_fraction: float, what: str, source: str) -> int:
    """How many of ``total`` units go to eval: round(fraction * total), at least 1, at most total-1."""
    if eval_fraction == 0.0:
        return 0
    n = max(1, round(eval_fraction * total))
    if n >= total:
        raise PromptError(
            f"prompts.eval_fraction={eval_fraction} leaves no training {what} in '{source}' "
            f"({total} {what}); lower prompts.eval_fraction or use a larger prompt set"
        )
    return n


def split_shuffled(pset: PromptSet, eval_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Seeded shuffle of prompts; both splits keep the source order."""
    n_eval = _n_held_out(len(pset.prompts), eval_fraction, "prompts", pset.source)
    order = list(range(len(pset.prompts)))
    random.Random(seed).shuffle(order)
    held = set(order[:n_eval])
    train = [p for i, p in enumerate(pset.prompts) if i not in held]
    return train, [p for i, p in enumerate(pset.prompts) if i in held]


def split_by_phrasing(
    pset: PromptSet, eval_fraction: float, seed: int
) -> tuple[list[str], list[str], list[str]]:
    """Hold out whole phrasings: eval phrasings never appear in train, every label is in both.

    Only phrasings that exist for every label are candidates, so each eval phrasing brings
    every digit into eval. Returns (train, eval, eval_phrasings).
    """
    assert pset.phrasings is not None and pset.labels is not None
    all_labels = set(pset.labels)
    by_phrasing: dict[str, set[int]] = {}
    for ph, label in zip(pset.phrasings, pset.labels, strict=True):
        by_phrasing.setdefault(ph, set()).add(label)
    n_eval = _n_held_out(len(by_phrasing), eval_fraction, "phrasings", pset.source)
    candidates = [ph for ph, labels in by_phrasing.items() if labels == all_labels]
    random.Random(seed).shuffle(candidates)
    held = set(candidates[:n_eval])
    train = [p for p, ph in zip(pset.prompts, pset.phrasings, strict=True) if ph not in held]
    evals = [p for p, ph in zip(pset.prompts, pset.phrasings, strict=True) if ph in held]
    train_labels = {lb for lb, ph in zip(pset.labels, pset.phrasings, strict=True) if ph not in held}
    if len(held) < n_eval or train_labels != all_labels:
        raise PromptError(
            f"prompts.eval_fraction={eval_fraction}: '{pset.source}' has {len(candidates)} phrasings shared by "
            f"every digit, too few to hold out {n_eval} and keep every digit in training; lower the fraction"
        )
    return train, evals, [ph for ph in by_phrasing if ph in held]


def _split(pset: PromptSet, eval_fraction: float, seed: int) -> tuple[list[str], list[str], list[str] | None]:
    if pset.phrasings is not None:
        return split_by_phrasing(pset, eval_fraction, seed)
    return (*split_shuffled(pset, eval_fraction, seed), None)


def load_train_eval(source: str, eval_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """(train_prompts, eval_prompts) of ``source``, in memory (nothing written)."""
    _check_fraction(eval_fraction)
    train, evals, _ = _split(load_prompt_set(source), eval_fraction, seed)
    return train, evals


# ---------------------------------------------------------------------------------------------
# Writing and reading a split


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _lines(prompts: list[str]) -> str:
    return "".join(p + "\n" for p in prompts)


def _version() -> str:
    try:
        return f"sdpo {metadata.version('sdpo')}"
    except metadata.PackageNotFoundError:  # running from a source tree that is not installed
        return "sdpo (not installed)"


def prepare(prompts_cfg: PromptsConfig, out_dir: str | Path) -> PromptSplit:
    """Build the split of ``prompts_cfg.source``; write ``train.txt``, ``eval.txt``, ``manifest.json``.

    Everything is checked before anything is written; the files are written to a temporary
    directory beside ``out_dir`` and moved in, the manifest last (a half-moved split fails
    :func:`load_split`'s hash check). Other files in ``out_dir`` are left alone.
    """
    _check_fraction(prompts_cfg.eval_fraction)
    pset = load_prompt_set(prompts_cfg.source)
    train, evals, held = _split(pset, prompts_cfg.eval_fraction, prompts_cfg.seed)
    hashes: dict[str, str] = {}  # filled as the files are written
    manifest = {
        "source": prompts_cfg.source,
        "seed": prompts_cfg.seed,
        "eval_fraction": prompts_cfg.eval_fraction,
        "split_rule": "phrasing" if held is not None else "shuffle",
        "counts": {
            "raw": pset.raw_count,
            "unique": len(pset.prompts),
            "train": len(train),
            "eval": len(evals),
        },
        "eval_phrasings": held,
        **({"source_version": pset.version} if pset.version else {}),
        "sha256": hashes,
        "created_by": _version(),
    }
    out = Path(out_dir).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        for name, prompts in zip(FILES, (train, evals), strict=True):
            (tmp / name).write_text(_lines(prompts), encoding="utf-8")
            hashes[name] = _sha256(tmp / name)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        out.mkdir(exist_ok=True)
        for name in (*FILES, MANIFEST):
            (tmp / name).replace(out / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return PromptSplit(train, evals, manifest)


def load_split(out_dir: str | Path) -> PromptSplit:
    """Read a split written by :func:`prepare`, checking each file against the manifest's sha256."""
    out = Path(out_dir)
    mpath = out / MANIFEST
    if not mpath.is_file():
        raise PromptError(f"no prompt split at '{out}' (missing {MANIFEST}); run `sdpo prepare` first")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise PromptError(f"'{mpath}' is not valid JSON: {exc}") from None
    hashes = manifest["sha256"] if isinstance(manifest, dict) and "sha256" in manifest else {}
    prompts = []
    for name in FILES:
        path = out / name
        if not path.is_file() or name not in hashes:
            raise PromptError(
                f"prompt split '{out}' has no {name} or no hash for it; run `sdpo prepare` again"
            )
        expected, got = hashes[name], _sha256(path)
        if got != expected:
            raise PromptError(
                f"'{path}' does not match its manifest (sha256 {got[:12]}..., manifest says "
                f"{str(expected)[:12]}...): it changed after `sdpo prepare`; run it again"
            )
        prompts.append(path.read_text(encoding="utf-8").splitlines())
    return PromptSplit(prompts[0], prompts[1], manifest)
