"""The stage declarations (sdpo_core/stages.py) drive the CLI, `sdpo run`'s order and the dvc.yaml
check: a stage added there shows up in all three; the tracker context manager ends runs right."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import pytest

from sdpo_core import cli, stages
from sdpo_core.config import load_config
from sdpo_core.rundir.paths import default_run_dir, eval_dir, prompts_dir
from sdpo_core.tracking.runs import tracked
from sdpo_core.tracking.trackers import NullTracker

ROOT = Path(__file__).resolve().parents[2]
calls: list[tuple[str, object]] = []


def export_command(cfg, run_dir, args) -> None:
    calls.append(("export", args.fmt))


EXPORT = stages.Stage(
    "export", "write the trained model in another format", export_command,
    params=("model",), inputs=("final",), outputs=("export",),
    options=(stages.Option(("--fmt",), {"default": "onnx"}),),
)


@pytest.fixture
def with_export(monkeypatch):
    """STAGES with ``export`` declared after evaluate (the CLI holds its own reference)."""
    declared = (*stages.STAGES, EXPORT)
    monkeypatch.setattr(stages, "STAGES", declared)
    monkeypatch.setattr(cli, "STAGES", declared)
    calls.clear()
    return declared


def test_every_declared_stage_is_a_subcommand_with_its_options():
    parser = cli.build_parser()
    for s in stages.STAGES:
        args = parser.parse_args([s.name, "--pipeline", "tiny-random"])
        assert args.func is cli.cmd_stage and args.stage is s
        assert hasattr(args, "run_dir") == s.takes_run_dir
    assert parser.parse_args(["train", "--pipeline", "p", "--resume"]).resume is True
    assert parser.parse_args(["base", "--pipeline", "p", "--force"]).force is True
    assert parser.parse_args(["evaluate", "--pipeline", "p", "--model", "m"]).model == "m"


def test_a_new_declaration_is_a_new_subcommand(with_export, capsys, tmp_path):
    parser = cli.build_parser()
    args = parser.parse_args(["export", "--pipeline", "tiny-random", "--fmt", "gguf"])
    assert args.stage is EXPORT
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    assert "export" in capsys.readouterr().out
    args = parser.parse_args(["export", "--pipeline", "tiny-random", "--fmt", "gguf", "--run-dir", str(tmp_path)])
    assert cli.cmd_stage(args) == 0 and calls == [("export", "gguf")]


tmp_final = Path("final")


def _fake(name: str, order: list[str], **changes) -> stages.Stage:
    def step(run: stages.RunState):
        order.append(name)
        return {"train": tmp_final, "evaluate": {}}.get(name, name)

    return dataclasses.replace(stages.stage(name), step=step, **changes)


def test_run_pipeline_runs_the_declared_stages_in_order(with_export, monkeypatch, tmp_path):
    """`sdpo run` = the declarations that are in_run and apply, in order; a stage without a step
    of its own runs its command with the options' defaults; register (in_run=False) is left out."""
    order: list[str] = []
    declared = (*(_fake(n, order) for n in ("prepare", "base", "train", "evaluate")),
                stages.stage("register"), EXPORT)
    monkeypatch.setattr(stages, "STAGES", declared)
    monkeypatch.setattr(stages, "check_train_start", lambda *a: None)
    monkeypatch.setattr("sdpo_core.evaluation.evaluate.format_table", lambda result: "TABLE")
    cfg = load_config("tiny-random", ["tracking.backend=none"], ROOT / "pipelines.yaml")
    result = stages.run_pipeline(cfg, tmp_path)
    assert cfg.model.build and order == ["prepare", "base", "train", "evaluate"]
    assert calls == [("export", "onnx")]  # after evaluate, with its default
    assert result.final == tmp_final and result.summary.startswith("TABLE")
    hub = cfg.model_copy(update={"model": cfg.model.model_copy(update={"build": None})})
    assert stages.run_pipeline(hub, tmp_path).final == tmp_final
    assert order[4:] == ["prepare", "train", "evaluate"]  # base applies to embedded builds only


def test_dvc_check_fails_on_a_declared_stage_dvc_yaml_lacks(with_export):
    spec = importlib.util.spec_from_file_location("test_structure", ROOT / "tests/unit/test_structure.py")
    structure = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(structure)
    with pytest.raises(AssertionError):
        structure.test_dvc_yaml_defines_the_declared_stages()


def test_versioned_stages_are_the_dvc_ones():
    assert stages.versioned_stages() == ["prepare", "base", "train", "evaluate"]
    assert [s.name for s in stages.STAGES] == ["prepare", "base", "train", "evaluate", "register"]


def test_run_dir_paths():
    assert default_run_dir("digits-tiny") == Path("runs") / "digits-tiny"
    assert prompts_dir("r") == Path("r/prompts") and eval_dir("r") == Path("r/eval")


class Recording(NullTracker):
    def __init__(self) -> None:
        super().__init__()
        self.ended: list[str] = []

    def end(self, status: str = "FINISHED") -> None:
        self.ended.append(status)


def test_tracked_ends_finished_or_failed():
    ok, bad, stopped = Recording(), Recording(), Recording()
    with tracked(ok) as t:
        assert t is ok
    with pytest.raises(ValueError), tracked(bad):
        raise ValueError("boom")
    with pytest.raises(KeyboardInterrupt), tracked(stopped):
        raise KeyboardInterrupt
    assert (ok.ended, bad.ended, stopped.ended) == (["FINISHED"], ["FAILED"], ["FAILED"])
