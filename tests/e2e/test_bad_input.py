"""Bad input through the real `sdpo` command: exit 2, one error line naming the file, key or value
and what was expected, never a traceback (README "What happens when...").

Most rows call ``sdpo_core.cli.main`` in this process (the same code `sdpo` runs, seconds instead
of a process start each); ``test_exit_code_path_in_real_processes`` runs a handful as real `sdpo`
processes, which proves the exit status and the stderr a shell sees.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sdpo_core.cli import main

ROOT = Path(__file__).resolve().parents[2]
PIPELINES = str(ROOT / "pipelines.yaml")
LATIN1 = b"\xe9"


def _files(d: Path, base: Path) -> dict[str, str]:
    """Bad files, one per row that needs one; returns name -> path."""
    texts: dict[str, bytes] = {
        "entry_list.yaml": b"defaults: {}\npipelines:\n  x: [1, 2]\n",
        "latin1.yaml": b"defaults: {}\npipelines:\n  x: {model: {pretrained: \"caf" + LATIN1 + b"\"}}\n",
        "not_yaml.yaml": b"pipelines: [\n",
        "top_list.yaml": b"- 1\n- 2\n",
        "top_unknown.yaml": b"foo: 1\npipelines: {x: {}}\n",
        "defaults_list.yaml": b"defaults: [1]\npipelines: {x: {model: {pretrained: m}}}\n",
        "name_int.yaml": b"pipelines: {1: {model: {pretrained: m}}}\n",
        "orch_unknown.yaml": b"prefect:\n  prot: 4200\n",
        "orch_list.yaml": b"- prefect\n",
        "orch_not_yaml.yaml": b"prefect: {port: \n",
        "orch_latin1.yaml": b"s3:\n  bucket: caf" + LATIN1 + b"\n",
        "prompts_latin1.txt": b"a cat\na caf" + LATIN1 + b"\n",
        "prompts_empty.txt": b"\n   \n",
    }
    models = {
        "kandinsky/model_index.json": json.dumps({"_class_name": "KandinskyPipeline"}).encode(),
        "index_list/model_index.json": b"[]",
        "index_no_class/model_index.json": b'{"_diffusers_version": "0.30.0"}',
        "index_class_int/model_index.json": b'{"_class_name": 7}',
        "index_truncated/model_index.json": b'{"_class_name": "StableDiff',
        "meta_truncated/sdpo_model.json": b'{"base_model": "runs/x/base", "fin',
        "meta_list/sdpo_model.json": b"[1]",
        "meta_finetune/sdpo_model.json": json.dumps({"base_model": str(base), "finetune": "half"}).encode(),
        "meta_no_base/sdpo_model.json": b'{"finetune": "lora"}',
        "meta_family/sdpo_model.json": json.dumps({"base_model": str(base), "finetune": "lora",
                                                   "family": ["sd"]}).encode(),
        "no_index/readme.txt": b"not a pipeline",
    }
    out = {}
    for name, data in {**texts, **models}.items():
        path = d / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        out[name] = str(path if name in texts else path.parent)
    (d / "prompts_dir").mkdir()
    out["prompts_dir"] = str(d / "prompts_dir")
    return out


def _show(*sets: str, pipeline: str = "tiny-random") -> list[str]:
    return ["config", "show", pipeline, "--pipelines", PIPELINES, *(a for s in sets for a in ("--set", s))]


def _gen(*args: str) -> list[str]:
    return ["generate", "--prompt", "a seven", "--out", "never.png", *args]


# (row id, argv from (files, tiny base, tmp dir), environment, text the one error line must hold)
ROWS = [
    # the pipelines file
    ("pipelines-entry-is-a-list", lambda f, b, t: ["config", "show", "x", "--pipelines", f["entry_list.yaml"]],
     {}, "pipeline 'x' must be a name with a mapping of config sections, got a list"),
    ("pipelines-latin1-byte", lambda f, b, t: ["config", "show", "x", "--pipelines", f["latin1.yaml"]],
     {}, "latin1.yaml: not UTF-8 text (byte 0xe9"),
    ("pipelines-latin1-list", lambda f, b, t: ["config", "list", "--pipelines", f["latin1.yaml"]],
     {}, "not UTF-8 text"),
    ("pipelines-not-yaml", lambda f, b, t: ["config", "show", "x", "--pipelines", f["not_yaml.yaml"]],
     {}, "not_yaml.yaml: not valid YAML"),
    ("pipelines-missing", lambda f, b, t: ["config", "show", "x", "--pipelines", f"{t}/none.yaml"],
     {}, "pipelines file not found"),
    ("pipelines-top-is-a-list", lambda f, b, t: ["config", "show", "x", "--pipelines", f["top_list.yaml"]],
     {}, "expected a mapping with 'defaults' and 'pipelines'"),
    ("pipelines-unknown-top-key", lambda f, b, t: ["config", "show", "x", "--pipelines", f["top_unknown.yaml"]],
     {}, "unknown top-level keys ['foo']"),
    ("pipelines-defaults-list", lambda f, b, t: ["config", "show", "x", "--pipelines", f["defaults_list.yaml"]],
     {}, "'defaults' must be a mapping"),
    ("pipelines-name-is-a-number", lambda f, b, t: ["config", "list", "--pipelines", f["name_int.yaml"]],
     {}, "pipeline 1 must be a name"),
    ("pipelines-unknown-name", lambda f, b, t: ["config", "show", "tiny-randm", "--pipelines", PIPELINES],
     {}, "no pipeline named 'tiny-randm'; did you mean 'tiny-random'"),
    # --set: types, ranges, keys, syntax
    ("set-int-from-bool", lambda f, b, t: _show("model.lora_rank=true"), {}, "'model.lora_rank'"),
    ("set-epochs-from-bool", lambda f, b, t: _show("train.epochs=false"), {}, "'train.epochs'"),
    ("set-float-from-bool", lambda f, b, t: _show("train.learning_rate=true"), {}, "'train.learning_rate'"),
    ("set-log-scale-inf", lambda f, b, t: _show("train.log_scale=inf"), {}, "'train.log_scale'"),
    ("set-adv-clip-inf", lambda f, b, t: _show("train.adv_clip_max=.inf"), {}, "'train.adv_clip_max'"),
    ("set-lr-nan", lambda f, b, t: _show("train.learning_rate=nan"), {}, "'train.learning_rate'"),
    ("set-eval-steps-bool", lambda f, b, t: _show("evaluate.steps=[true]"), {}, "'evaluate.steps.0'"),
    ("set-eval-steps-too-many", lambda f, b, t: _show(f"model.pretrained={b}", "evaluate.steps=[5000]"),
     {}, "'evaluate.steps': [5000] exceeds 1000"),
    ("set-sample-steps-too-many", lambda f, b, t: _show(f"model.pretrained={b}", "sample.num_steps=999",
                                                       "sample.sampler=lcm"),
     {}, "'sample.num_steps': [999] exceeds 50"),
    ("set-eval-steps-zero", lambda f, b, t: _show("evaluate.steps=[0]"), {}, "'evaluate.steps'"),
    ("set-eval-steps-text", lambda f, b, t: _show("evaluate.steps=abc"), {}, "'evaluate.steps'"),
    ("set-lora-alpha-negative", lambda f, b, t: _show("model.lora_alpha=-1"), {}, "'model.lora_alpha'"),
    ("set-eta-zero", lambda f, b, t: _show("sample.eta=0"), {}, "'sample.eta'"),
    ("set-method-unknown", lambda f, b, t: _show("train.method=ppo"), {}, "'train.method'"),
    ("set-eval-fraction-one", lambda f, b, t: _show("prompts.eval_fraction=1.0"), {}, "'prompts.eval_fraction'"),
    ("set-unknown-key", lambda f, b, t: _show("train.lerning_rate=1"), {},
     "unknown key 'train.lerning_rate'; did you mean 'train.learning_rate'"),
    ("set-unknown-section", lambda f, b, t: _show("sampel.eta=1"), {}, "unknown key 'sampel'"),
    ("set-no-equals", lambda f, b, t: _show("train.epochs"), {}, "--set expects key=value, got 'train.epochs'"),
    ("set-empty-key", lambda f, b, t: _show("=3"), {}, "--set has an empty key"),
    ("set-bad-yaml", lambda f, b, t: _show("train.epochs=[1"), {}, "--set train.epochs: cannot read value"),
    ("set-into-a-value", lambda f, b, t: _show("train.epochs.x=1"), {}, "'epochs' is a value, not a section"),
    ("set-section-to-number", lambda f, b, t: _show("train=3"), {}, "'train'"),
    ("set-batch-not-dividing", lambda f, b, t: _show("train.batch_size=3"), {}, "train.batch_size=3 does not divide"),
    ("set-min-count-over-buffer", lambda f, b, t: _show("train.stat_tracking.min_count=100"), {},
     "min_count (100) exceeds buffer_size"),
    # rewards
    ("reward-os-system", lambda f, b, t: _show("reward.name=os:system", "reward.options.command=id"), {},
     "module 'os' is not allowed to provide rewards"),
    ("reward-unknown", lambda f, b, t: _show("reward.name=jpeg_compresibility"), {},
     "unknown reward 'jpeg_compresibility'; did you mean 'jpeg_compressibility'"),
    ("reward-not-installed", lambda f, b, t: _show("reward.name=no_such_module_xyz:score"), {},
     "cannot import module 'no_such_module_xyz'"),
    ("reward-server-port", lambda f, b, t: ["reward-server", "--reward", "brightness", "--port", "99999"], {},
     "a port is 0..65535, got '99999'"),
    ("reward-server-os-system", lambda f, b, t: ["reward-server", "--reward", "os:system"], {},
     "module 'os' is not allowed"),
    # model directories and sdpo generate's options (checked before any model loads: --model is absent)
    ("generate-eta-zero", lambda f, b, t: _gen("--model", f"{t}/absent", "--eta", "0"), {}, "'eta': Value error, must be > 0"),
    ("generate-eta-inf", lambda f, b, t: _gen("--model", f"{t}/absent", "--eta", "inf"), {}, "'eta'"),
    ("generate-guidance-below-1", lambda f, b, t: _gen("--model", f"{t}/absent", "--guidance-scale", "0.5"), {},
     "'guidance_scale'"),
    ("generate-steps-over-scheduler", lambda f, b, t: _gen("--model", str(b), "--steps", "5000"), {},
     "'--steps': [5000] exceeds 1000"),
    ("model-class-unsupported", lambda f, b, t: _gen("--model", f["kandinsky/model_index.json"]), {},
     "pipeline class 'KandinskyPipeline' is not supported"),
    ("model-index-list", lambda f, b, t: _gen("--model", f["index_list/model_index.json"]), {},
     "model_index.json: expected a JSON object with ['_class_name'], got a list"),
    ("model-index-no-class", lambda f, b, t: _gen("--model", f["index_no_class/model_index.json"]), {},
     "expected '_class_name' to be a string, got None"),
    ("model-index-class-int", lambda f, b, t: _gen("--model", f["index_class_int/model_index.json"]), {},
     "expected '_class_name' to be a string, got 7"),
    ("model-index-truncated", lambda f, b, t: _gen("--model", f["index_truncated/model_index.json"]), {},
     "model_index.json: not valid JSON"),
    ("model-dir-without-index", lambda f, b, t: _gen("--model", f["no_index/readme.txt"]), {},
     "is not a diffusers pipeline directory (no model_index.json)"),
    ("trained-meta-truncated", lambda f, b, t: _gen("--model", f["meta_truncated/sdpo_model.json"]), {},
     "sdpo_model.json: not valid JSON"),
    ("trained-meta-list", lambda f, b, t: _gen("--model", str(b), "--lora", f["meta_list/sdpo_model.json"]), {},
     "sdpo_model.json: expected a JSON object"),
    ("trained-meta-finetune", lambda f, b, t: _gen("--model", f["meta_finetune/sdpo_model.json"]), {},
     "expected 'finetune' to be 'lora' or 'full', got 'half'"),
    ("trained-meta-no-base", lambda f, b, t: _gen("--model", f["meta_no_base/sdpo_model.json"]), {},
     "expected 'base_model' to be a string"),
    ("trained-meta-family-list", lambda f, b, t: _gen("--model", f["meta_family/sdpo_model.json"]), {},
     "expected 'family' to be a str, got ['sd']"),
    # prompt files (sdpo prepare)
    ("prompts-latin1", lambda f, b, t: ["prepare", "--pipeline", "tiny-random", "--pipelines", PIPELINES,
                                        "--run-dir", t, "--set", f"prompts.source={f['prompts_latin1.txt']}"],
     {}, "is not valid UTF-8: byte 0xe9"),
    ("prompts-empty", lambda f, b, t: ["prepare", "--pipeline", "tiny-random", "--pipelines", PIPELINES,
                                       "--run-dir", t, "--set", f"prompts.source={f['prompts_empty.txt']}"],
     {}, "has no prompts after dropping empty lines"),
    ("prompts-directory", lambda f, b, t: ["prepare", "--pipeline", "tiny-random", "--pipelines", PIPELINES,
                                           "--run-dir", t, "--set", f"prompts.source={f['prompts_dir']}"],
     {}, "is a directory"),
    # orchestration settings (sdpo stack status)
    ("settings-port-text", lambda f, b, t: ["stack", "status"], {"SDPO_PREFECT__PORT": "abc"},
     "environment variable SDPO_PREFECT__PORT: 'prefect.port'"),
    ("settings-port-range", lambda f, b, t: ["stack", "status"], {"SDPO_MLFLOW__PORT": "70000"},
     "SDPO_MLFLOW__PORT: 'mlflow.port'"),
    ("settings-unknown-key", lambda f, b, t: ["stack", "status"], {"SDPO_ORCHESTRATION_FILE": "orch_unknown.yaml"},
     "orch_unknown.yaml: unknown key 'prefect.prot'"),
    ("settings-file-list", lambda f, b, t: ["stack", "status"], {"SDPO_ORCHESTRATION_FILE": "orch_list.yaml"},
     "orch_list.yaml: expected a mapping of sections"),
    ("settings-not-yaml", lambda f, b, t: ["stack", "status"], {"SDPO_ORCHESTRATION_FILE": "orch_not_yaml.yaml"},
     "orch_not_yaml.yaml: not valid YAML"),
    ("settings-latin1", lambda f, b, t: ["stack", "status"], {"SDPO_ORCHESTRATION_FILE": "orch_latin1.yaml"},
     "orch_latin1.yaml: not UTF-8 text"),
]


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, tiny_base) -> dict[str, str]:
    return _files(tmp_path_factory.mktemp("bad"), tiny_base)


def _one_error_line(err: str, expected: str) -> None:
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1, err  # argparse's usage lines may precede its one error line
    assert expected in errors[0], err


def test_table_has_at_least_40_distinct_rows():
    assert len(ROWS) >= 40 and len({row[0] for row in ROWS}) == len(ROWS)


@pytest.mark.parametrize(("argv", "env", "expected"), [r[1:] for r in ROWS], ids=[r[0] for r in ROWS])
def test_bad_input_exits_2_with_one_line(argv, env, expected, bad_files, tiny_base, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(Path(bad_files["entry_list.yaml"]).parent)  # the orchestration files are relative
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    try:
        code = main(argv(bad_files, tiny_base, str(tmp_path / "run")))
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    assert code == 2
    _one_error_line(capsys.readouterr().err, expected)
    assert not (tmp_path / "run" / "prompts").exists()  # nothing written half-way


PROCESS_ROWS = ("pipelines-entry-is-a-list", "reward-os-system", "settings-port-text", "reward-server-port")


def test_exit_code_path_in_real_processes(bad_files, tiny_base, tmp_path):
    """The same rows as real `sdpo` processes, all started at once (each pays its own imports)."""
    rows = {r[0]: r for r in ROWS}
    procs = {}
    for name in PROCESS_ROWS:
        _, argv, env, expected = rows[name]
        cmd = [sys.executable, "-m", "sdpo_core.cli", *argv(bad_files, tiny_base, str(tmp_path / "run"))]
        full_env = {**os.environ, "PYTHONPATH": str(ROOT), **env}
        procs[name] = (subprocess.Popen(cmd, cwd=Path(bad_files["entry_list.yaml"]).parent, env=full_env,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), expected)
    for name, (proc, expected) in procs.items():
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 2, (name, err)
        _one_error_line(err, expected)
