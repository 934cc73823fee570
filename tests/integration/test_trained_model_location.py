"""A trained model directory names its base so that it loads from any working directory: a local
base relative to the model directory (it moves with the run directory), while a file written
before that (only a working-directory-relative ``base_model``) is read as before."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sdpo_core.families.hub import ModelLoadError
from sdpo_core.families.loading import MODEL_META, load_trained
from sdpo_core.training.trainer import Trainer

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def trained(tiny_cfg, tiny_base, tmp_path, monkeypatch):
    """A run trained in ``tmp_path/proj`` with a base given relative to that working directory,
    as pipelines.yaml gives the embedded ones (runs/<pipeline>/base)."""
    proj = tmp_path / "proj"
    shutil.copytree(tiny_base, proj / "runs" / "x" / "base")
    monkeypatch.chdir(proj)
    final = Trainer(tiny_cfg("model.pretrained=runs/x/base", "train.epochs=1"), "runs/x").run()
    return (proj / final).resolve()


def test_generate_loads_a_trained_model_from_another_directory(trained, tmp_path):
    """`sdpo generate --model <abs final>` run elsewhere (bug caught: the base looked up relative
    to the working directory: 'runs/x/base' not found)."""
    meta = json.loads((trained / MODEL_META).read_text())
    assert meta["base_model"] == "runs/x/base" and meta["base_model_dir"] == "../base"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = subprocess.run(
        [sys.executable, "-m", "sdpo_core.cli", "generate", "--model", str(trained), "--prompt", "a seven",
         "--steps", "1", "--num-images", "1", "--out", "seven.png"],
        cwd=elsewhere, env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)},
        capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (elsewhere / "seven.png").stat().st_size > 0


def test_a_moved_run_dir_still_loads_and_old_files_read_as_before(trained, tmp_path, monkeypatch):
    """The run directory moved with its base: still loads (relative to the model dir). An older
    sdpo_model.json (no base_model_dir) resolves base_model against the working directory, as before."""
    moved = tmp_path / "moved"
    shutil.move(trained.parents[2], moved)  # proj/runs/x/final -> moved/runs/x/final
    monkeypatch.chdir(tmp_path)
    final = moved / "runs" / "x" / "final"
    assert load_trained(final).denoiser is not None

    meta = json.loads((final / MODEL_META).read_text())
    del meta["base_model_dir"]
    (final / MODEL_META).write_text(json.dumps(meta))
    with pytest.raises(ModelLoadError, match="runs/x/base"):
        load_trained(final)
    monkeypatch.chdir(moved)
    assert load_trained(final).denoiser is not None
