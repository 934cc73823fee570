"""Typed, strict configuration read from ``pipelines.yaml``.

A pipeline's config is ``defaults`` deep-merged with the pipeline's own overrides, then with
command-line ``--set a.b=value`` overrides, then validated once. Unknown keys are rejected with
their dotted path and the closest valid name; values are range-checked; batch arithmetic is
derived by :func:`batch_plan` and checked with a sentence that says what to change.

Usage::

    cfg = load_config("digits-tiny", overrides=["train.epochs=3"])
    print(cfg.train.learning_rate)
"""

from __future__ import annotations

import difflib
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

DEFAULT_PIPELINES_FILE = Path("pipelines.yaml")


class ConfigError(ValueError):
    """A configuration problem a user can fix; the message says where and what to change."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Strict):
    pretrained: str = Field(description="hub id or local diffusers directory")
    revision: str | None = None
    build: Literal["digits-tiny", "random-tiny"] | None = Field(
        default=None, description="embedded builder that `sdpo base` runs when `pretrained` does not exist"
    )
    build_seed: int = Field(default=0, description="seed of the embedded builder (independent of `seed`)")
    build_steps: int = Field(default=2000, ge=1, description="optimizer steps of the embedded builder's UNet")
    build_vae_steps: int = Field(default=300, ge=1, description="optimizer steps of the embedded builder's VAE")
    finetune: Literal["lora", "full"] = "lora"
    lora_rank: int = Field(default=4, ge=1, le=1024)
    lora_alpha: float | None = Field(default=None, gt=0, description="defaults to lora_rank (scale 1)")
    lora_target_modules: list[str] = Field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    gradient_checkpointing: bool = False
    timestep_spacing: Literal["leading", "trailing", "linspace"] | None = Field(
        default=None, description="override the scheduler's spacing (SD-Turbo: trailing)"
    )


class PromptsConfig(_Strict):
    source: str = "digits"
    eval_fraction: float = Field(default=0.2, ge=0.0, lt=1.0)
    seed: int = 0


class SampleConfig(_Strict):
    num_steps: int = Field(default=4, ge=1, le=1000)
    eta: float = Field(default=1.0, ge=0.0, le=1.0)
    guidance_scale: float = Field(default=1.0, ge=1.0)
    batch_size: int = Field(default=8, ge=1, description="prompts per sampling batch, per process")
    num_batches_per_epoch: int = Field(default=2, ge=1)
    resolution: int | None = Field(default=None, ge=8, description="image side in pixels; model default if unset")
    last_step: Literal["clamp", "final_alpha"] = Field(
        default="clamp", description="clamp: the paper's stochastic last step; final_alpha: diffusers exactly"
    )

    @field_validator("eta")
    @classmethod
    def _eta_positive(cls, v: float) -> float:
        if v == 0.0:
            raise ValueError("must be > 0: with eta 0 DDIM is deterministic and has no log-probability to train")
        return v


class RewardConfig(_Strict):
    name: str = "jpeg_compressibility"
    options: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of the reward's factory")


class StatTrackingConfig(_Strict):
    enabled: bool = True
    buffer_size: int = Field(default=32, ge=1)
    min_count: int = Field(default=16, ge=1)

    @model_validator(mode="after")
    def _min_le_buffer(self) -> StatTrackingConfig:
        if self.min_count > self.buffer_size:
            raise ValueError(
                f"min_count ({self.min_count}) exceeds buffer_size ({self.buffer_size}): the buffer "
                "would never hold enough values; lower min_count or raise buffer_size"
            )
        return self


class TrainConfig(_Strict):
    method: Literal["sdpo", "ddpo"] = "sdpo"
    epochs: int = Field(default=2, ge=1)
    batch_size: int = Field(default=4, ge=1, description="pairs (sdpo) or trajectories (ddpo) per backward")
    gradient_accumulation_steps: int = Field(default=1, ge=1)
    learning_rate: float = Field(default=1e-4, gt=0, le=1.0)
    adam_beta1: float = Field(default=0.9, ge=0, lt=1)
    adam_beta2: float = Field(default=0.999, ge=0, lt=1)
    adam_weight_decay: float = Field(default=1e-4, ge=0)
    adam_epsilon: float = Field(default=1e-8, gt=0)
    max_grad_norm: float = Field(default=1.0, gt=0)
    num_inner_epochs: int = Field(default=1, ge=1)
    timestep_fraction: float = Field(default=1.0, gt=0, le=1.0)
    gamma: float = Field(default=0.99, ge=0, le=1)
    lam: float = Field(default=0.99, gt=0, le=1)
    log_scale: float = Field(default=1.0, gt=0)
    clip_range: float = Field(default=1e-4, ge=0)
    adv_clip_max: float = Field(default=5.0, gt=0)
    shuffle_timesteps: bool = True
    update_schedule: Literal["auto", "per_step", "per_trajectory"] = Field(
        default="auto",
        description="per_step: an optimizer step per step position (every gradient_accumulation_steps "
        "batches; SDPO's loop); per_trajectory: gradients accumulated over all trained steps of "
        "gradient_accumulation_steps batches (DDPO's loop); auto: per_step for sdpo, per_trajectory for ddpo",
    )
    recompute_log_probs: Literal["auto", "always", "never"] = Field(
        default="never",
        description="score sampled transitions again in the training batch layout before the first update; "
        "never: the sampling-time log-probs, as the paper; always; auto: only under mixed precision (for "
        "devices whose half-precision kernels depend on the batch layout: watch check/first_batch_kl)",
    )
    shuffle_batch: bool = True
    dense_reward: bool = Field(default=True, description="ablation: false gives the final reward at every step")
    anchor: bool = Field(default=True, description="ablation: false predicts from first and last only")
    stat_tracking: StatTrackingConfig = Field(default_factory=StatTrackingConfig)
    checkpoint_every: int = Field(default=1, ge=1, description="epochs between checkpoints")
    keep_checkpoints: int = Field(default=2, ge=1)
    async_checkpoint: bool = Field(
        default=True, description="write checkpoints in a background thread while the next epoch runs"
    )


class EvaluateConfig(_Strict):
    steps: list[int] = Field(default_factory=lambda: [1, 2, 4, 8])
    num_prompts: int = Field(default=32, ge=1)
    samples_per_prompt: int = Field(default=2, ge=1)
    seed: int = 1234
    batch_size: int = Field(default=32, ge=1)
    metrics: list[str] = Field(default_factory=list, description="extra metrics by name (sdpo_core.metrics)")

    @field_validator("steps")
    @classmethod
    def _steps_valid(cls, v: list[int]) -> list[int]:
        if not v or any(s < 1 for s in v):
            raise ValueError(f"must be a non-empty list of positive step counts, got {v}")
        return sorted(set(v))


class RegisterConfig(_Strict):
    model_name: str = "sdpo-model"
    rule: Literal["all_steps_ci", "all_steps_mean", "mean_over_steps"] = "all_steps_ci"


class TrackingConfig(_Strict):
    backend: Literal["none", "mlflow"] = "mlflow"
    experiment: str = "sdpo"
    log_images_every: int = Field(
        default=10, ge=1,
        description="epochs between sample grids (RUN_DIR/samples/epoch_NNNN.png, also logged to the tracker): "
        "first-step and final x0 of the first batch's first 4 trajectories, with their rewards and prompts",
    )


# BaseModel's metaclass has an ABC ``register`` method; the design fixes ``register`` as a key.
warnings.filterwarnings("ignore", message='Field name "register"', category=UserWarning)


class Config(_Strict):
    pipeline: str = "custom"
    seed: int = 42
    model: ModelConfig
    prompts: PromptsConfig = Field(default_factory=PromptsConfig)
    sample: SampleConfig = Field(default_factory=SampleConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    register: RegisterConfig = Field(default_factory=RegisterConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


@dataclass(frozen=True)
class BatchPlan:
    """Batch arithmetic of one epoch, derived from the config and the number of processes."""

    num_processes: int
    prompts_per_process: int  # sample.batch_size * num_batches_per_epoch
    trajectories_per_process: int  # x2 for the pairs (both methods sample pairs)
    train_items_per_process: int  # pairs (sdpo) or trajectories (ddpo)
    train_batches_per_process: int
    optimizer_steps_per_epoch: int
    samples_per_epoch: int  # trajectories over all processes


def resolve_update_schedule(t: TrainConfig) -> str:
    """``train.update_schedule`` with ``auto`` resolved: per_step (sdpo) or per_trajectory (ddpo)."""
    if t.update_schedule != "auto":
        return t.update_schedule
    return "per_step" if t.method == "sdpo" else "per_trajectory"


def micro_steps_per_update(cfg: Config) -> int:
    """Backward passes accumulated into one optimizer step."""
    t = cfg.train
    if resolve_update_schedule(t) == "per_step":
        return t.gradient_accumulation_steps
    return t.gradient_accumulation_steps * max(1, math.ceil(cfg.sample.num_steps * t.timestep_fraction))


def batch_plan(cfg: Config, num_processes: int = 1) -> BatchPlan:
    """Derive and check batch arithmetic; raises ConfigError with what to change."""
    if num_processes < 1:
        raise ConfigError(f"num_processes must be >= 1, got {num_processes}")
    s, t = cfg.sample, cfg.train
    prompts = s.batch_size * s.num_batches_per_epoch
    trajectories = 2 * prompts
    items = prompts if t.method == "sdpo" else trajectories
    if items % t.batch_size:
        raise ConfigError(
            f"train.batch_size={t.batch_size} does not divide the {items} "
            f"{'pairs' if t.method == 'sdpo' else 'trajectories'} each process samples per epoch "
            f"(sample.batch_size={s.batch_size} x sample.num_batches_per_epoch={s.num_batches_per_epoch}"
            f"{'' if t.method == 'sdpo' else ' x 2'}); choose a train.batch_size that divides {items}"
        )
    batches = items // t.batch_size
    if batches % t.gradient_accumulation_steps:
        raise ConfigError(
            f"train.gradient_accumulation_steps={t.gradient_accumulation_steps} does not divide the {batches} "
            f"train batches per process and step position; choose a value that divides {batches} "
            "or change train.batch_size / sample.num_batches_per_epoch"
        )
    steps_trained = max(1, math.ceil(s.num_steps * t.timestep_fraction))
    per_step = resolve_update_schedule(t) == "per_step"
    total = trajectories * num_processes
    if total % num_processes:  # per-process sizes make this hold; kept for clarity of the contract
        raise ConfigError(f"samples per epoch ({total}) must be divisible by the {num_processes} processes")
    return BatchPlan(
        num_processes=num_processes,
        prompts_per_process=prompts,
        trajectories_per_process=trajectories,
        train_items_per_process=items,
        train_batches_per_process=batches,
        optimizer_steps_per_epoch=(steps_trained if per_step else 1) * t.num_inner_epochs * batches
        // t.gradient_accumulation_steps,
        samples_per_epoch=total,
    )


# ---------------------------------------------------------------------------------------------
# Loading, merging, overrides


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def _valid_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        keys.append(path)
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys.extend(_valid_keys(ann, path + "."))
    return keys


def _format_validation_error(err: ValidationError, source: str) -> str:
    valid = _valid_keys(Config)
    lines = [f"invalid configuration ({source}):"]
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            close = difflib.get_close_matches(path, valid, n=1, cutoff=0.6)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            lines.append(f"  - unknown key '{path}'{hint}")
        elif e["type"] == "missing":
            lines.append(f"  - missing required key '{path}'")
        else:
            got = e.get("input")
            lines.append(f"  - '{path}': {e['msg']} (got {got!r})")
    return "\n".join(lines)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``a.b=value``; the value is read as YAML (``3``, ``1e-4``, ``[1,2]``, ``true``)."""
    if "=" not in text:
        raise ConfigError(f"--set expects key=value, got {text!r}")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set has an empty key in {text!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {key}: cannot read value {raw!r}: {exc}") from exc
    if isinstance(value, bool) and raw.strip().lower() not in ("true", "false"):
        value = raw.strip()  # YAML 1.1 reads no/yes/on/off as booleans: `mixed_precision=no` means "no"
    if isinstance(value, str) and _is_number(value):
        value = float(value)  # YAML 1.1 reads "1e-4" as a string
    return key.split("."), value


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    out = _deep_merge({}, raw)
    for text in overrides:
        path, value = parse_override(text)
        node = out
        for part in path[:-1]:
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            elif not isinstance(nxt, dict):
                raise ConfigError(f"--set {text}: '{part}' is a value, not a section")
            node = nxt
        node[path[-1]] = value
    return out


def read_pipelines_file(path: Path = DEFAULT_PIPELINES_FILE) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"pipelines file not found: {path} (run from the project root or pass --pipelines)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict) or "pipelines" not in data or not isinstance(data["pipelines"], dict):
        raise ConfigError(f"{path}: expected a mapping with 'defaults' and 'pipelines' sections")
    unknown = set(data) - {"defaults", "pipelines"}
    if unknown:
        raise ConfigError(f"{path}: unknown top-level keys {sorted(unknown)}; expected 'defaults' and 'pipelines'")
    return data


def pipeline_names(path: Path = DEFAULT_PIPELINES_FILE) -> list[str]:
    return list(read_pipelines_file(path)["pipelines"])


def validate_dict(raw: dict[str, Any], source: str) -> Config:
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, source)) from None


def load_config(
    pipeline: str, overrides: list[str] | None = None, path: Path = DEFAULT_PIPELINES_FILE
) -> Config:
    """Resolve pipeline ``pipeline`` from ``path``: defaults <- pipeline <- overrides, validated."""
    data = read_pipelines_file(path)
    pipelines = data["pipelines"]
    if pipeline not in pipelines:
        close = difflib.get_close_matches(pipeline, list(pipelines), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"{path}: no pipeline named '{pipeline}'{hint} (have: {', '.join(pipelines)})")
    raw = _deep_merge(data.get("defaults") or {}, pipelines[pipeline] or {})
    raw["pipeline"] = pipeline
    raw = apply_overrides(raw, overrides or [])
    cfg = validate_dict(raw, f"{path}, pipeline '{pipeline}'")
    batch_plan(cfg)
    check_reward(cfg, f"{path}, pipeline '{pipeline}'")
    return cfg


def check_reward(cfg: Config, source: str) -> None:
    """The reward must be registered or an importable ``module:function`` (checked at load)."""
    from sdpo_core.rewards import RewardError, validate_reward_name

    try:
        validate_reward_name(cfg.reward.name)
    except RewardError as exc:
        raise ConfigError(f"invalid configuration ({source}): 'reward.name': {exc}") from None


def load_resolved(path: Path) -> Config:
    """Load a resolved config saved with a run (``DIR/config.yaml``)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"resolved config not found: {path}")
    return validate_dict(yaml.safe_load(path.read_text(encoding="utf-8")), str(path))


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
