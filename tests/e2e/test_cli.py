"""The `sdpo` command as a user runs it (subprocess): train, resume, generate, bad input, tracking."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]


def sdpo(*args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "sdpo_core.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def test_help_lists_commands():
    out = sdpo("--help")
    assert out.returncode == 0
    for cmd in ("run", "prepare", "base", "train", "evaluate", "generate", "config"):
        assert cmd in out.stdout
    assert "--resume" in sdpo("train", "--help").stdout


def test_help_is_light_and_has_core_and_plugin_commands():
    """`sdpo --help` imports no model or orchestration library (it would take seconds), and lists
    register / export-metrics (core) beside flows' stack / deploy / version (plugin)."""
    code = (
        "import sys\nfrom sdpo_core.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in ('torch', 'diffusers', 'mlflow', 'prefect', 'dvc') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("[]")
    for cmd in ("register", "export-metrics", "stack", "deploy", "version"):
        assert f"    {cmd}" in out.stdout


def test_cli_without_flows_keeps_core_commands(monkeypatch):
    """flows/ is an optional plugin: without it the core commands (register included) remain."""
    from sdpo_core.cli import build_parser

    monkeypatch.setitem(sys.modules, "flows", None)  # `import flows` now fails as if not installed
    monkeypatch.delitem(sys.modules, "flows.commands", raising=False)
    commands = set(build_parser()._subparsers._group_actions[0].choices)
    assert {"register", "export-metrics", "train", "evaluate"} <= commands
    assert not {"stack", "deploy", "version"} & commands


def test_config_show_json_is_resolved():
    out = sdpo("config", "show", "sd-turbo-pickscore", "--json")
    assert out.returncode == 0, out.stderr
    cfg = json.loads(out.stdout)
    assert cfg["train"]["learning_rate"] == 6e-5 and cfg["model"]["pretrained"] == "stabilityai/sd-turbo"


def test_bad_input_exits_2_and_writes_nothing(tmp_path):
    run_dir = tmp_path / "run"
    out = sdpo("train", "--pipeline", "tiny-random", "--run-dir", str(run_dir), "--set", "train.lerning_rate=1")
    assert out.returncode == 2
    assert "unknown key 'train.lerning_rate'; did you mean 'train.learning_rate'?" in out.stderr
    assert not run_dir.exists()
    out = sdpo("train", "--pipeline", "no-such-pipeline")
    assert out.returncode == 2 and "no pipeline named" in out.stderr


def test_generate_with_zero_steps_exits_2(tmp_path):
    # was: ZeroDivisionError deep in the scheduler
    out = sdpo("generate", "--model", str(tmp_path / "none"), "--prompt", "a seven", "--steps", "0",
               "--out", str(tmp_path / "x.png"))
    assert out.returncode == 2
    assert "argument --steps: expected a whole number >= 1, got 0" in out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "x.png").exists()


def test_refused_start_builds_no_model_and_opens_no_tracking_run(tmp_path):
    # checkpoints exist, no --resume: refused before `base` builds the embedded model and before an
    # MLflow run is opened (was: both happened first, then the refusal)
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints" / "epoch_0000").mkdir(parents=True)
    base, db = tmp_path / "base", tmp_path / "mlflow.db"
    out = sdpo("train", "--pipeline", "tiny-random", "--run-dir", str(run_dir), "--set", f"model.pretrained={base}",
               "--set", "tracking.experiment=refused", env_extra={"MLFLOW_TRACKING_URI": f"sqlite:///{db}"})
    assert out.returncode == 2 and "pass --resume to continue it" in out.stderr, out.stderr[-2000:]
    assert not base.exists() and not db.exists()
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoints"]  # nothing written, no lock left


@pytest.mark.slow
def test_train_resume_generate_with_mlflow(tiny_base, tmp_path):
    run_dir = tmp_path / "run"
    db = tmp_path / "mlflow.db"
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{db}"}
    common = ["--pipeline", "tiny-random", "--run-dir", str(run_dir), "--set", f"model.pretrained={tiny_base}",
              "--set", "tracking.experiment=cli-test"]
    out = sdpo("train", *common, "--set", "train.epochs=1", env_extra=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "learning_rate" in out.stdout  # the resolved config is printed at start
    assert (run_dir / "final" / "pytorch_lora_weights.safetensors").is_file()
    assert (run_dir / "config.yaml").is_file() and (run_dir / "checkpoints" / "epoch_0000").is_dir()
    # a second start without --resume refuses; with --resume it continues where it stopped
    again = sdpo("train", *common, "--set", "train.epochs=2", env_extra=env)
    assert again.returncode == 2 and "--resume" in again.stderr
    resumed = sdpo("train", *common, "--set", "train.epochs=2", "--resume", env_extra=env)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "starting at epoch 1" in resumed.stderr
    assert (run_dir / "checkpoints" / "epoch_0001").is_dir()
    epochs = [json.loads(line)["epoch"] for line in (run_dir / "train_metrics.jsonl").read_text().splitlines()]
    assert epochs == [0, 1]  # epoch 0 was not sampled again
    png = tmp_path / "seven.png"
    gen = sdpo("generate", "--model", str(tiny_base), "--lora", str(run_dir / "final"), "--prompt", "a seven",
               "--steps", "2", "--num-images", "2", "--out", str(png))
    assert gen.returncode == 0, gen.stderr[-2000:]
    assert Image.open(png).size[0] >= 2 * 32
    # MLflow got params and per-epoch metrics for both training runs
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{db}")
    exp = client.get_experiment_by_name("cli-test")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 2  # first train and the resumed one: the refused start opened no run
    finished = [r for r in runs if r.info.status == "FINISHED"]
    assert len(finished) == 2
    assert all("reward/last" in r.data.metrics and "train.learning_rate" in r.data.params for r in finished)


@pytest.mark.parametrize("pipeline,model_id", [
    ("sdxl-turbo-pickscore", "stabilityai/sdxl-turbo"),
    ("lcm-pickscore", "SimianLuo/LCM_Dreamshaper_v7"),
    ("sd35-large-turbo-pickscore", "stabilityai/stable-diffusion-3.5-large-turbo"),
    ("flux-schnell-pickscore", "black-forest-labs/FLUX.1-schnell"),
])
def test_hub_pipelines_validate_and_stop_at_the_download(tmp_path, pipeline, model_id):
    # offline, with no cached weights: one line naming the model and what to do, exit 2
    proc = sdpo("train", "--pipeline", pipeline, "--run-dir", str(tmp_path / "run"), "--set", "tracking.backend=none")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"cannot load model '{model_id}'" in proc.stderr and "Traceback" not in proc.stderr
