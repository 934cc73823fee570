"""Every shipped pipeline validates; every invalid config fails with its expected message."""

from pathlib import Path

import pytest

from sdpo_core.config import (
    ConfigError,
    batch_plan,
    load_config,
    micro_steps_per_update,
    parse_override,
    pipeline_names,
    resolve_update_schedule,
)

ROOT = Path(__file__).resolve().parents[2]
INVALID = sorted((ROOT / "tests" / "configs" / "invalid").glob("*.yaml"))


@pytest.mark.parametrize("name", pipeline_names(ROOT / "pipelines.yaml"))
def test_shipped_pipelines_validate(name):
    cfg = load_config(name, path=ROOT / "pipelines.yaml")
    assert cfg.pipeline == name
    assert batch_plan(cfg).optimizer_steps_per_epoch >= 1


def test_paper_settings_of_sd_turbo_pipelines():
    lrs = {"aesthetic": 1e-4, "imagereward": 5e-5, "hpsv2": 5e-5, "pickscore": 6e-5}
    for reward, lr in lrs.items():
        cfg = load_config(f"sd-turbo-{reward}", path=ROOT / "pipelines.yaml")
        assert cfg.reward.name == reward and cfg.train.learning_rate == lr
        assert (cfg.sample.eta, cfg.sample.guidance_scale, cfg.sample.num_steps) == (1.0, 1.0, 50)
        t = cfg.train
        assert (t.gamma, t.lam, t.clip_range, t.adv_clip_max) == (0.99, 0.99, 1e-4, 5.0)
        assert (t.stat_tracking.buffer_size, t.stat_tracking.min_count) == (32, 16)
        assert cfg.model.finetune == "lora" and cfg.model.timestep_spacing == "trailing"


@pytest.mark.parametrize("path", INVALID, ids=[p.stem for p in INVALID])
def test_invalid_configs_fail_clearly(path):
    expected = path.read_text().splitlines()[0].removeprefix("# expect: ")
    with pytest.raises(ConfigError) as err:
        load_config("x", path=path)
    assert expected in str(err.value)


def test_set_overrides_types_and_errors():
    assert parse_override("train.learning_rate=1e-4") == (["train", "learning_rate"], 1e-4)
    assert parse_override("evaluate.steps=[1, 4]") == (["evaluate", "steps"], [1, 4])
    assert parse_override("train.shuffle_timesteps=false")[1] is False
    assert parse_override("model.mixed_precision=no")[1] == "no"
    cfg = load_config("tiny-random", ["train.epochs=5", "sample.num_steps=3"], ROOT / "pipelines.yaml")
    assert (cfg.train.epochs, cfg.sample.num_steps) == (5, 3)
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("train.epochs")
    with pytest.raises(ConfigError, match="no pipeline named 'digits-tinny'; did you mean 'digits-tiny'"):
        load_config("digits-tinny", path=ROOT / "pipelines.yaml")
    with pytest.raises(ConfigError, match="is a value, not a section"):
        load_config("tiny-random", ["seed.x=1"], ROOT / "pipelines.yaml")


def test_batch_plan_arithmetic():
    cfg = load_config("tiny-random", ["sample.batch_size=4", "sample.num_batches_per_epoch=2",
                                      "train.batch_size=2", "train.gradient_accumulation_steps=2",
                                      "sample.num_steps=3"], ROOT / "pipelines.yaml")
    plan = batch_plan(cfg, num_processes=2)
    # 8 pairs per process -> 4 train batches; 3 step positions x 4 batches / 2 accumulation = 6
    assert (plan.train_items_per_process, plan.train_batches_per_process) == (8, 4)
    assert plan.optimizer_steps_per_epoch == 6 and plan.samples_per_epoch == 32
    # SDPO with DDPO's update schedule: each batch's 3 steps accumulated -> 4 batches / 2 = 2 updates
    per_traj = load_config("tiny-random", ["sample.batch_size=4", "sample.num_batches_per_epoch=2",
                                           "train.batch_size=2", "train.gradient_accumulation_steps=2",
                                           "sample.num_steps=3", "train.update_schedule=per_trajectory"],
                           ROOT / "pipelines.yaml")
    assert batch_plan(per_traj).optimizer_steps_per_epoch == 2
    assert micro_steps_per_update(cfg) == 2 and micro_steps_per_update(per_traj) == 6
    # DDPO defaults to its own schedule: 16 trajectories / 2 = 8 batches, / 2 accumulation = 4 updates
    ddpo = load_config("tiny-random", ["sample.batch_size=4", "sample.num_batches_per_epoch=2",
                                       "train.batch_size=2", "train.gradient_accumulation_steps=2",
                                       "sample.num_steps=3", "train.method=ddpo"], ROOT / "pipelines.yaml")
    assert resolve_update_schedule(ddpo.train) == "per_trajectory"
    assert batch_plan(ddpo).optimizer_steps_per_epoch == 4
    # DDPO trains on single trajectories: 4 prompts x 2 = 8 per process, which 3 does not divide
    with pytest.raises(ConfigError, match="does not divide the 8 trajectories"):
        load_config("tiny-random", ["train.method=ddpo", "train.batch_size=3"], ROOT / "pipelines.yaml")


def test_config_docs_are_generated_from_the_models():
    """docs/config.md is exactly what `sdpo config docs` prints: fails when a key is added, renamed,
    re-defaulted or re-described in config.py without regenerating the file."""
    from sdpo_core.config_docs import DOC_PATH, config_markdown

    assert DOC_PATH == ROOT / "docs" / "config.md"
    assert DOC_PATH.read_text(encoding="utf-8") == config_markdown(), (
        "docs/config.md is stale: run `sdpo config docs --write docs/config.md`"
    )


def test_every_config_key_is_documented():
    """A key added without Field(description=...) would show an empty meaning in docs/config.md."""
    from sdpo_core.config_docs import config_markdown, undocumented_keys

    assert undocumented_keys() == []
    text = config_markdown()
    for key in ("seed", "model.pretrained", "train.stat_tracking.min_count", "register.model_name"):
        assert f"| `{key}` |" in text
    assert "| `train.lam` | float, > 0, <= 1 | `0.99` |" in text  # type, range and default columns


def test_config_docs_cli_writes_the_file(tmp_path, capsys):
    from sdpo_core.cli import main
    from sdpo_core.config_docs import config_markdown

    out = tmp_path / "config.md"
    assert main(["config", "docs", "--write", str(out)]) == 0
    assert out.read_text(encoding="utf-8") == config_markdown()


def test_grpo_group_size_must_fit_the_epoch():
    # 2 x 4 prompts x 2 batches = 16 trajectories per process
    base = ["sample.batch_size=4", "sample.num_batches_per_epoch=2", "train.method=grpo", "train.batch_size=4"]
    assert batch_plan(load_config("tiny-random", [*base, "train.grpo.group_size=8"], ROOT / "pipelines.yaml")).train_items_per_process == 16
    with pytest.raises(ConfigError, match=r"train.grpo.group_size=6 does not divide the 16 trajectories"):
        batch_plan(load_config("tiny-random", [*base, "train.grpo.group_size=6"], ROOT / "pipelines.yaml"))
    with pytest.raises(ConfigError, match=r"'train.grpo.group_size': Input should be greater than or equal to 2"):
        load_config("tiny-random", [*base, "train.grpo.group_size=1"], ROOT / "pipelines.yaml")
