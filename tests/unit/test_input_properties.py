"""Property-based tests of every reader of user input: whatever it is given, it returns a result or
raises one of the errors `sdpo` turns into exit 2 (``cli._bad_input_errors``) with a one-line
message; never another exception (which `sdpo` would print as a traceback, exit 1).

Bounded: a few dozen examples per property, no deadline (the machine is shared), well under a minute in all.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sdpo_core.cli import _bad_input_errors
from sdpo_core.config import Config, _valid_keys, load_config, parse_override, read_pipelines_file
from sdpo_core.families import family_for
from sdpo_core.families.loading import read_model_meta
from sdpo_core.prompts import load_prompt_set

ROOT = Path(__file__).resolve().parents[2]
PIPELINES = ROOT / "pipelines.yaml"
BOUNDED = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
KEYS = _valid_keys(Config)

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(), st.text(max_size=12))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=8)), inner,
                                                 max_size=3)), max_leaves=8)
# a config as nested sections over the real keys (so values reach the validators), with stray keys
configs = st.dictionaries(st.sampled_from(KEYS), values, max_size=6).map(lambda flat: _nest(flat))
no_nul = st.text(alphabet=st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), max_size=20)


def _nest(flat: dict) -> dict:
    out: dict = {}
    for key, value in sorted(flat.items()):
        node = out
        *parents, last = key.split(".")
        for part in parents:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[last] = value
    return out


def _outcome(fn, *args):
    """``fn(*args)``'s result, or None when it raised a bad-input error with a one-line message."""
    try:
        return fn(*args)
    except _bad_input_errors() as exc:
        assert str(exc) and "\n" not in str(exc), repr(str(exc))
        return None


def _write(data: bytes, name: str) -> Path:
    path = Path(tempfile.mkdtemp()) / name
    path.write_bytes(data)
    return path


def _dump(doc) -> bytes:
    return yaml.safe_dump(doc, allow_unicode=True).encode("utf-8")


@BOUNDED
@given(defaults=st.one_of(configs, values), pipeline=st.one_of(configs, values))
def test_pipelines_file_of_any_shape(defaults, pipeline):
    path = _write(_dump({"defaults": defaults, "pipelines": {"p": pipeline}}), "pipelines.yaml")
    _outcome(load_config, "p", [], path)


@BOUNDED
@given(data=st.one_of(st.binary(max_size=200), values.map(_dump)))
def test_pipelines_file_of_any_bytes(data):
    path = _write(data, "pipelines.yaml")
    _outcome(read_pipelines_file, path)
    _outcome(load_config, "p", [], path)


@BOUNDED
@given(overrides=st.lists(st.one_of(
    st.tuples(st.sampled_from(KEYS), st.text(max_size=12)).map("=".join), st.text(max_size=16)), max_size=4))
def test_set_overrides_of_any_text(overrides):
    for text in overrides:
        _outcome(parse_override, text)
    _outcome(load_config, "tiny-random", overrides, PIPELINES)


@BOUNDED
@given(doc=st.one_of(values, st.dictionaries(st.sampled_from(["prefect", "mlflow", "s3", "dvc", "schedule",
                                                                "state_dir", "extra"]), values, max_size=3)),
       raw=st.binary(max_size=60), use_raw=st.booleans(),
       env=st.dictionaries(st.sampled_from(["SDPO_PREFECT__PORT", "SDPO_MLFLOW__WORKERS", "SDPO_DVC__PUSH",
                                            "SDPO_SCHEDULE__OVERRIDES", "SDPO_S3__PREFIX"]), no_nul, max_size=2))
def test_orchestration_settings_of_any_file_and_environment(doc, raw, use_raw, env):
    from flows.settings import load_settings

    path = _write(raw if use_raw else _dump(doc), "orchestration.yaml")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SDPO_ORCHESTRATION_FILE", str(path))
        for key in [k for k in os.environ if k.startswith("SDPO_") and k != "SDPO_ALLOWED_REWARD_MODULES"]:
            mp.delenv(key)
        for key, value in env.items():
            mp.setenv(key, value)
        _outcome(load_settings)


json_values = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=12)),
                           lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                   st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                           max_leaves=6)
index_docs = st.one_of(json_values, st.fixed_dictionaries({"_class_name": json_values}),
                       st.fixed_dictionaries({"_class_name": st.sampled_from(
                           ["StableDiffusionPipeline", "KandinskyPipeline", "", "FluxPipeline"])}))
meta_docs = st.one_of(json_values, st.fixed_dictionaries(
    {"base_model": json_values, "finetune": st.one_of(st.sampled_from(["lora", "full"]), json_values)},
    optional={"family": json_values, "base_lora": json_values, "base_lora_scale": json_values}))


def _json_bytes(doc, raw: bytes, use_raw: bool) -> bytes:
    return raw if use_raw else json.dumps(doc).encode("utf-8")


@BOUNDED
@given(doc=index_docs, raw=st.binary(max_size=60), use_raw=st.booleans())
def test_model_index_of_any_content(doc, raw, use_raw):
    path = _write(_json_bytes(doc, raw, use_raw), "model_index.json")
    _outcome(family_for, str(path.parent))


@BOUNDED
@given(doc=meta_docs, raw=st.binary(max_size=60), use_raw=st.booleans())
def test_sdpo_model_json_of_any_content(doc, raw, use_raw):
    path = _write(_json_bytes(doc, raw, use_raw), "sdpo_model.json")
    meta = _outcome(read_model_meta, path.parent)
    if meta is not None:  # what load_trained reads next is there and of the right type
        assert isinstance(meta["base_model"], str) and meta["finetune"] in ("lora", "full")


@BOUNDED
@given(data=st.one_of(st.binary(max_size=200), st.text(max_size=100).map(lambda t: t.encode("utf-8"))))
def test_prompt_file_of_any_bytes(data):
    path = _write(data, "prompts.txt")
    pset = _outcome(load_prompt_set, str(path))
    if pset is not None:
        assert pset.prompts and all(p.strip() == p and p for p in pset.prompts)
