"""Prompt sets: cleaning, deterministic splits, digits phrasing hold-out, manifest, bad input."""

from __future__ import annotations

import hashlib
import json

import pytest

from sdpo_core import prompts as P
from sdpo_core.config import PromptsConfig
from sdpo_core.prompts import PromptError, load_split, load_train_eval, normalise, prepare


def _cfg(source: str, eval_fraction: float = 0.2, seed: int = 0) -> PromptsConfig:
    return PromptsConfig(source=source, eval_fraction=eval_fraction, seed=seed)


def _write(path, text: str):
    path.write_text(text, encoding="utf-8")
    return str(path)


# ----------------------------------------------------------------------- cleaning


def test_normalise_strips_collapses_and_dedupes_case_insensitively():
    raw = ["  a  red\tfox ", "A red fox", "", "   ", "a dog", "a red fox", "A DOG\n", "the cat"]
    assert normalise(raw) == ["a red fox", "a dog", "the cat"]  # first spelling kept, order kept


def test_file_source_counts_raw_and_unique(tmp_path):
    src = _write(tmp_path / "p.txt", "\ufeffa cat\n\n  a   cat\nA dog\na fox\na bird\n")
    split = prepare(_cfg(src, 0.25), tmp_path / "out")
    assert split.manifest["counts"] == {"raw": 6, "unique": 4, "train": 3, "eval": 1}
    assert sorted(split.train + split.eval) == ["A dog", "a bird", "a cat", "a fox"]


# ----------------------------------------------------------------------- splits


def test_shuffled_split_is_deterministic_and_seeded():
    a_train, a_eval = load_train_eval("simple_animals", 0.2, seed=0)
    b_train, b_eval = load_train_eval("simple_animals", 0.2, seed=0)
    _, c_eval = load_train_eval("simple_animals", 0.2, seed=1)
    assert (a_train, a_eval) == (b_train, b_eval)
    assert c_eval != a_eval
    assert not set(a_train) & set(a_eval)
    assert len(a_eval) == round(0.2 * (len(a_train) + len(a_eval)))


def test_zero_fraction_gives_no_eval_split():
    train, evals = load_train_eval("complex_animals", 0.0, seed=0)
    assert evals == [] and len(train) >= 100


def test_digits_split_holds_out_whole_phrasings():
    pairs = P.digit_prompts()
    digit_of = dict(pairs)
    train, evals = load_train_eval("digits", 0.2, seed=0)
    phrasing = {p: P.digit_phrasing(p, digit_of[p]) for p in train + evals}
    train_ph, eval_ph = {phrasing[p] for p in train}, {phrasing[p] for p in evals}
    assert eval_ph and not train_ph & eval_ph  # no eval phrasing is ever trained on
    assert {digit_of[p] for p in train} == {digit_of[p] for p in evals} == set(range(10))
    assert len(eval_ph) == round(0.2 * len(train_ph | eval_ph))
    assert len(evals) == 10 * len(eval_ph)  # each held-out phrasing brings all ten digits
    assert load_train_eval("digits", 0.2, seed=1) != (train, evals)


def test_digit_phrasing_unifies_articles_and_forms():
    assert P.digit_phrasing("an eight", 8) == P.digit_phrasing("a seven", 7) == "a <w>"
    assert P.digit_phrasing("a handwritten digit 3", 3) == "a handwritten digit <n>"


def test_builtin_sets_and_generators_are_clean_and_deterministic():
    assert 40 <= len(load_train_eval("simple_animals", 0.0, 0)[0]) <= 60
    assert len(load_train_eval("complex_animals", 0.0, 0)[0]) >= 100
    for name in P.GENERATORS:
        first = load_train_eval(f"template:{name}", 0.1, 3)
        assert first == load_train_eval(f"template:{name}", 0.1, 3)
        assert len(first[0]) + len(first[1]) > 100
    prompts = P.GENERATORS["animals-activities"]()
    assert "an owl playing chess" in prompts and "a cat riding a bike" in prompts


# ----------------------------------------------------------------------- files and manifest


def test_prepare_writes_files_and_manifest_with_matching_hashes(tmp_path):
    out = tmp_path / "split"
    split = prepare(_cfg("digits", 0.2, seed=5), out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest == split.manifest
    for name in ("train.txt", "eval.txt"):
        assert manifest["sha256"][name] == hashlib.sha256((out / name).read_bytes()).hexdigest()
    assert (out / "train.txt").read_text().splitlines() == split.train
    assert manifest["source"] == "digits" and manifest["seed"] == 5 and manifest["eval_fraction"] == 0.2
    assert manifest["split_rule"] == "phrasing" and len(manifest["eval_phrasings"]) == 2
    assert manifest["created_by"].startswith("sdpo")
    assert load_split(out) == split
    assert (split.train, split.eval) == load_train_eval("digits", 0.2, 5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["split"]  # no temporary directory left


def test_prepare_replaces_its_files_and_keeps_others(tmp_path):
    out = tmp_path / "split"
    out.mkdir()
    (out / "notes.md").write_text("mine")
    prepare(_cfg("simple_animals", 0.2, seed=0), out)
    second = prepare(_cfg("simple_animals", 0.4, seed=0), out)
    assert load_split(out) == second
    assert (out / "notes.md").read_text() == "mine"


def test_load_split_detects_edited_file(tmp_path):
    prepare(_cfg("simple_animals"), tmp_path)
    with (tmp_path / "eval.txt").open("a", encoding="utf-8") as f:
        f.write("a sneaky extra prompt\n")
    with pytest.raises(PromptError, match=r"eval\.txt' does not match its manifest"):
        load_split(tmp_path)


def test_load_split_without_manifest(tmp_path):
    with pytest.raises(PromptError, match="missing manifest.json"):
        load_split(tmp_path)


# ----------------------------------------------------------------------- bad input


def _bad_inputs(tmp_path):
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes(b"a cat\ncaf" + b"\xe9\n")  # byte 9 is 0xe9, on line 2
    return [
        (_cfg(str(tmp_path / "nope.txt")), r"file '.*nope\.txt' does not exist"),
        (
            _cfg(_write(tmp_path / "blank.txt", " \n\n\t\n")),
            r"no prompts after dropping empty lines.*3 raw lines",
        ),
        (_cfg(str(latin1)), r"not valid UTF-8: byte 0xe9 at byte offset 9 \(line 2\)"),
        (
            _cfg("animals"),
            r"'animals' is neither a built-in.*known sets: digits, simple_animals, complex_animals",
        ),
        (
            _cfg("template:nope"),
            r"unknown generator 'template:nope'; known generators: template:animals-activities",
        ),
        (
            PromptsConfig.model_construct(source="digits", eval_fraction=1.0, seed=0),
            r"prompts.eval_fraction: got 1.0, expected a number in \[0, 1\)",
        ),
        (PromptsConfig.model_construct(source="digits", eval_fraction=-0.1, seed=0), r"got -0.1"),
        (_cfg(_write(tmp_path / "one.txt", "a cat\n"), 0.5), r"leaves no training prompts.*1 prompts"),
        (_cfg("digits", 0.99), r"leaves no training phrasings"),
    ]


def test_bad_input_raises_prompt_error_and_writes_nothing(tmp_path):
    for cfg, message in _bad_inputs(tmp_path):
        out = tmp_path / "out" / "split"
        with pytest.raises(PromptError, match=message):
            prepare(cfg, out)
        assert not (tmp_path / "out").exists(), cfg.source
        with pytest.raises(PromptError, match=message):
            load_train_eval(cfg.source, cfg.eval_fraction, cfg.seed)
