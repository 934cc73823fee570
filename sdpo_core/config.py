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
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeVar

import yaml
from pydantic import (
    AllowInfNan,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

if TYPE_CHECKING:
    from sdpo_core.methods import Method

DEFAULT_PIPELINES_FILE = Path("pipelines.yaml")


def _methods() -> dict[str, type[Method]]:
    """The method registry (``methods.METHODS``): a method is valid here once it is listed there."""
    # imported on use, like the reward registry in check_reward: the methods' maths imports torch,
    # and light commands (`sdpo --help`) import this module
    from sdpo_core.methods import METHODS

    return METHODS


class ConfigError(ValueError):
    """A configuration problem a user can fix; the message says where and what to change."""


def _not_bool(value: Any) -> Any:
    """pydantic reads true as 1 in a number field: `model.lora_rank=true` would train rank 1."""
    if isinstance(value, bool):
        raise ValueError("expected a number, not true/false")
    return value


# number fields of the config: no booleans, and floats finite (inf passes `gt=0` and breaks training)
Int = Annotated[int, BeforeValidator(_not_bool)]
Float = Annotated[float, BeforeValidator(_not_bool), AllowInfNan(False)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


_S = TypeVar("_S", bound=_Strict)


class ModelConfig(_Strict):
    """The base model, how it is built (embedded defaults) and how it is fine-tuned."""

    pretrained: str = Field(description="hub id or local diffusers directory")
    revision: str | None = Field(default=None, description="hub revision (branch, tag or commit) of `pretrained`")
    build: Literal["digits-tiny", "digits-flow-tiny", "random-tiny"] | None = Field(
        default=None, description="embedded builder that `sdpo base` runs when `pretrained` does not exist"
    )
    build_seed: Int = Field(default=0, description="seed of the embedded builder (independent of `seed`)")
    build_steps: Int = Field(default=2000, ge=1, description="optimizer steps of the embedded builder's UNet")
    build_vae_steps: Int = Field(default=300, ge=1, description="optimizer steps of the embedded builder's VAE")
    finetune: Literal["lora", "full"] = Field(
        default="lora", description="train LoRA adapters on the UNet, or every UNet weight"
    )
    lora_rank: Int = Field(default=4, ge=1, le=1024, description="LoRA rank")
    lora_alpha: Float | None = Field(default=None, gt=0, description="defaults to lora_rank (scale 1)")
    init_from: str | None = Field(
        default=None, description="warm start: the LoRA starts from these weights instead of a random init: "
        "`models:/NAME@champion` (or any models:/ URI), a run directory (its final/) or a trained LoRA directory; "
        "same base, family and LoRA rank, checked")
    family: Literal["sd", "sdxl", "sd3", "flux"] | None = Field(
        default=None, description="model family; read from model_index.json's _class_name when unset")
    base_lora: str | None = Field(
        default=None, description="a few-step LoRA (LCM-LoRA, Hyper-SD, TCD; local dir or hub id) fused into the "
        "base before training, e.g. SDXL + LCM-LoRA")
    base_lora_scale: Float = Field(default=1.0, gt=0, description="scale at which model.base_lora is fused")
    family_options: dict[str, Any] = Field(
        default_factory=dict, description="options of the family's loader (sd: lcm_guidance_scale; sdxl: vae; "
        "sd3: use_t5, max_sequence_length; flux: max_sequence_length, guidance_scale)")
    lora_target_modules: list[str] | None = Field(
        default=None,
        description="denoiser modules that get LoRA adapters; unset: the family's (the attention projections)",
    )
    mixed_precision: Literal["no", "fp16", "bf16"] = Field(
        default="no", description="autocast precision of the model (accelerate); log-probs and losses stay float32"
    )
    gradient_checkpointing: bool = Field(
        default=False, description="recompute UNet activations in the backward pass (less memory, more time)"
    )
    timestep_spacing: Literal["leading", "trailing", "linspace"] | None = Field(
        default=None, description="override the scheduler's spacing (SD-Turbo: trailing)"
    )
    compile: bool = Field(
        default=False, description="torch.compile the denoiser (`nn.Module.compile`): fewer host operations per "
        "call after a compile per mode (sampling, training); the pre-update ratio need not be exactly 1 "
        "(BENCHMARKS.md 5d), check `check/first_batch_kl`"
    )
    cache_prompt_embeddings: bool = Field(
        default=False, description="encode every training prompt once before training, then free the text "
        "encoders (T5-XXL: ~10 GB of GPU memory in bf16); off: encode each batch's prompts as it is sampled"
    )


class PromptsConfig(_Strict):
    """The prompt set and its train/eval split (`sdpo prepare`)."""

    source: str = Field(
        default="digits",
        description="built-in set name, a file path (one prompt per line; DVC-tracked: the manifest records its "
        "DVC md5), a generator `template:<name>`, "
        "`s3://...` or `https://...` (fsspec; the manifest records its ETag / version id), or a `.jsonl` file "
        "(one object per line with a string `prompt`)",
    )
    eval_fraction: Float = Field(
        default=0.2, ge=0.0, lt=1.0, description="share of prompts held out for evaluation (never trained on)"
    )
    seed: Int = Field(default=0, description="seed of the train/eval split")


class SampleConfig(_Strict):
    """Sampling of training trajectories (stochastic DDIM)."""

    num_steps: Int = Field(default=4, ge=1, le=1000, description="denoising steps T of training trajectories")
    eta: Float = Field(
        default=1.0, ge=0.0, le=1.0, description="DDIM eta (> 0: the stochastic step has a log-probability)"
    )
    guidance_scale: Float = Field(default=1.0, ge=1.0, description="classifier-free guidance scale (1.0 = none)")
    batch_size: Int = Field(default=8, ge=1, description="prompts per sampling batch, per process")
    num_batches_per_epoch: Int = Field(default=2, ge=1, description="sampling batches per epoch, per process")
    resolution: Int | None = Field(default=None, ge=8, description="image side in pixels; model default if unset")
    last_step: Literal["clamp", "final_alpha"] = Field(
        default="clamp", description="clamp: the paper's stochastic last step (LCM: re-noise to t=0); "
        "final_alpha: diffusers exactly (deterministic, no log-prob at the last step)"
    )
    sampler: Literal["ddim", "lcm", "flow_sde"] | None = Field(
        default=None, description="stochastic sampler; read from the model's scheduler class when unset")
    sampler_options: dict[str, Any] = Field(
        default_factory=dict, description="extra options of the sampler (flow_sde: noise_level, sde_type)")

    @field_validator("eta")
    @classmethod
    def _eta_positive(cls, v: float) -> float:
        if v == 0.0:
            raise ValueError("must be > 0: with eta 0 DDIM is deterministic and has no log-probability to train")
        return v


class RewardConfig(_Strict):
    """The reward (docs/rewards.md); `sdpo rewards` lists the registered ones."""

    name: str = Field(
        default="jpeg_compressibility", description="registered reward name or `module:function`"
    )
    options: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of the reward's factory")


class StatTrackingConfig(_Strict):
    enabled: bool = Field(
        default=True, description="per-step, per-prompt advantage normalisation (false: batch statistics)"
    )
    buffer_size: Int = Field(default=32, ge=1, description="values kept per (prompt, step) in the running buffer")
    min_count: Int = Field(
        default=16, ge=1, description="values a prompt needs before its own statistics replace the batch's"
    )

    @model_validator(mode="after")
    def _min_le_buffer(self) -> StatTrackingConfig:
        if self.min_count > self.buffer_size:
            raise ValueError(
                f"min_count ({self.min_count}) exceeds buffer_size ({self.buffer_size}): the buffer "
                "would never hold enough values; lower min_count or raise buffer_size"
            )
        return self


class GRPOConfig(_Strict):
    """GRPO's groups (Flow-GRPO, DanceGRPO): read only when ``train.method: grpo``."""

    group_size: Int = Field(
        default=8, ge=2,
        description="trajectories per prompt in an epoch (each from its own x_T); advantages are normalised "
        "within the group (train.stat_tracking is not used)",
    )
    std: Literal["batch", "group"] = Field(
        default="batch",
        description="divisor of the advantage: the std over the whole epoch's rewards (Flow-GRPO's global_std, "
        "its default) or the group's own std (DanceGRPO)",
    )


class NFTConfig(_Strict):
    """DiffusionNFT (Zheng et al. 2025; NVlabs/DiffusionNFT): read only when ``train.method: nft``."""

    beta: Float = Field(
        default=1.0, gt=0,
        description="strength of the implicit policies: x0+ = (1 - beta) x0_old + beta x0, x0- = (1 + beta) x0_old "
        "- beta x0 (the paper's default 1.0; 0.1 in its OCR and multi-reward recipes)",
    )
    group_size: Int = Field(
        default=8, ge=2,
        description="trajectories per prompt in an epoch (each from its own x_T), rewards normalised within the "
        "group before they become optimality probabilities (the paper: 24 per prompt over 8 GPUs)",
    )
    std: Literal["batch", "group"] = Field(
        default="batch", description="divisor of the advantage: the std of the whole epoch's rewards (the "
        "paper's global_std) or the group's own",
    )
    adaptive_weight: bool = Field(
        default=True, description="divide each item's squared x0 error by its detached mean absolute error (the "
        "paper's adaptive weighting); false: the plain squared error",
    )
    kl_weight: Float = Field(
        default=1e-4, ge=0, description="weight of the paper's KL term, the mean squared distance of the "
        "denoiser's output to the reference's (the weights training started from); 0 skips that forward",
    )
    old_decay_max: Float = Field(
        default=0.5, ge=0, lt=1, description="the old policy (which samples and anchors the loss) moves after "
        "each epoch as old <- d old + (1 - d) trained, d = min(old_decay_rate x (step - old_decay_delay), "
        "old_decay_max) at optimizer step `step` (0 before the delay); the paper's default 0.5 (0.999 for OCR)",
    )
    old_decay_rate: Float = Field(
        default=0.001, ge=0, description="growth of d per optimizer step (the paper: 0.001; 0.0075 for OCR)"
    )
    old_decay_delay: Int = Field(
        default=0, ge=0, description="optimizer steps during which d is 0 (the paper: 0; 75 for OCR)"
    )


class TrainConfig(_Strict):
    """The RL method and its hyper-parameters (docs/architecture.md), the update loop and checkpoints."""

    method: str = Field(
        default="sdpo", description="sdpo (paired dense-reward difference loss), ddpo (PPO-clip on the final reward), "
        "grpo (PPO-clip on final rewards normalised within groups of train.grpo.group_size samples of a prompt) "
        "or nft (DiffusionNFT: implicit positive / negative policies on forward-noised final images, train.nft)"
    )
    epochs: Int = Field(default=2, ge=1, description="epochs of sampling + updates")
    batch_size: Int = Field(default=4, ge=1, description="pairs (sdpo) or trajectories (ddpo, grpo, nft) per backward")
    gradient_accumulation_steps: Int = Field(default=1, ge=1, description="train batches per optimizer step")
    learning_rate: Float = Field(default=1e-4, gt=0, le=1.0, description="AdamW learning rate")
    adam_beta1: Float = Field(default=0.9, ge=0, lt=1, description="AdamW beta1")
    adam_beta2: Float = Field(default=0.999, ge=0, lt=1, description="AdamW beta2")
    adam_weight_decay: Float = Field(default=1e-4, ge=0, description="AdamW weight decay")
    adam_epsilon: Float = Field(default=1e-8, gt=0, description="AdamW epsilon")
    max_grad_norm: Float = Field(default=1.0, gt=0, description="gradient clipping norm")
    num_inner_epochs: Int = Field(default=1, ge=1, description="passes of updates over each epoch's samples")
    timestep_fraction: Float = Field(
        default=1.0, gt=0, le=1.0, description="share of each trajectory's steps trained on (ceil of T x fraction)"
    )
    gamma: Float = Field(default=0.99, ge=0, le=1, description="discount of the returns along a trajectory")
    lam: Float = Field(default=0.99, gt=0, le=1, description="temporal importance weight base: w_t = lam^t / log_scale")
    log_scale: Float = Field(default=1.0, gt=0, description="divisor of the temporal weights w_t")
    clip_range: Float = Field(
        default=1e-4, ge=0, description="log-probs clamped to old +/- clip_range in the clipped loss"
    )
    adv_clip_max: Float = Field(default=5.0, gt=0, description="advantages clipped to [-adv_clip_max, adv_clip_max]")
    shuffle_timesteps: bool = Field(
        default=True, description="step-shuffled updates: each sample's steps in an independent random order"
    )
    update_schedule: Literal["auto", "per_step", "per_trajectory"] = Field(
        default="auto",
        description="per_step: an optimizer step per step position (every gradient_accumulation_steps "
        "batches; SDPO's loop); per_trajectory: gradients accumulated over all trained steps of "
        "gradient_accumulation_steps batches (DDPO's loop); auto: per_step for sdpo, per_trajectory for ddpo, grpo "
        "and nft",
    )
    recompute_log_probs: Literal["auto", "always", "never"] = Field(
        default="never",
        description="score sampled transitions again in the training batch layout before the first update; "
        "never: the sampling-time log-probs, as the paper; always; auto: only under mixed precision (for "
        "devices whose half-precision kernels depend on the batch layout: watch check/first_batch_kl)",
    )
    shuffle_batch: bool = Field(default=True, description="shuffle samples before they are cut into train batches")
    dense_reward: bool = Field(default=True, description="ablation: false gives the final reward at every step")
    anchor: bool = Field(default=True, description="ablation: false predicts from first and last only")
    skip_unused_queries: bool = Field(
        default=False,
        description="sdpo: do not score the x0 states the reward prediction leaves unused (the anchor under "
        "train.anchor=false; first and anchor under train.dense_reward=false): 2 or 1 reward queries per "
        "trajectory instead of 3, the same dense rewards; false: all three scored (the unused ones logged), as "
        "the paper",
    )
    stat_tracking: StatTrackingConfig = Field(default_factory=StatTrackingConfig)
    grpo: GRPOConfig = Field(default_factory=GRPOConfig)
    nft: NFTConfig = Field(default_factory=NFTConfig)
    kl_beta: Float = Field(
        default=0.0, ge=0,
        description="sdpo, ddpo, grpo: weight of the per-step KL to the reference policy (the weights training "
        "started from), KL = |mu - mu_ref|^2 / (2 std^2) per latent dim between the two step Gaussians, averaged "
        "(Flow-GRPO's beta); one more no-grad denoiser call per trained step; 0: off, as the papers' few-step "
        "recipes (nft's own term is train.nft.kl_weight)",
    )
    ema_decay: Float | None = Field(
        default=None, gt=0, lt=1,
        description="keep an EMA of the trained weights, updated after every optimizer step n with decay "
        "min(ema_decay, (1 + n) / (10 + n)) (DiffusionNFT's EMA; its recipes use 0.9): final/ (export, evaluation, "
        "registry) holds the EMA, and checkpoints keep it; null: off",
    )
    checkpoint_every: Int = Field(default=1, ge=1, description="epochs between checkpoints")
    keep_checkpoints: Int = Field(default=2, ge=1, description="most recent checkpoints kept (older ones deleted)")
    async_checkpoint: bool = Field(
        default=True, description="write checkpoints in a background thread while the next epoch runs"
    )
    nonfinite: Literal["stop", "skip"] = Field(
        default="stop",
        description="an update whose loss or gradient is NaN or infinite is skipped (weights and optimizer state "
        "unchanged, counted as nonfinite/skipped); stop: the run ends (exit 1, naming the last good checkpoint) "
        "after train.max_nonfinite_steps of them in a row; skip: the run goes on",
    )
    max_nonfinite_steps: int = Field(
        default=3, ge=1, description="skipped non-finite updates in a row after which train.nonfinite: stop ends the run"
    )
    num_processes: Int | None = Field(
        default=None, ge=1,
        description="training processes the Prefect flow launches on its machine (`accelerate launch "
        "--num_processes`; sample and train batch sizes are per process); null: one per visible GPU, 1 without "
        "one. `sdpo train` runs as many as the launcher it is started under",
    )

    @field_validator("method")
    @classmethod
    def _method_known(cls, v: str) -> str:
        names = list(_methods())
        if v not in names:
            quoted = [f"'{n}'" for n in names]
            raise PydanticCustomError("method", "Input should be {names}",
                                      {"names": ", ".join(quoted[:-1]) + " or " + quoted[-1]})
        return v


class EvaluateConfig(_Strict):
    """Base vs trained on the held-out prompts, with fixed seeds (`sdpo evaluate`, docs/eval_schema.md)."""

    steps: list[Int] = Field(default_factory=lambda: [1, 2, 4, 8], description="step counts to evaluate at")
    num_prompts: Int = Field(default=32, ge=1, description="eval prompts used (at most the held-out set)")
    samples_per_prompt: Int = Field(default=2, ge=1, description="images per prompt and step count")
    seed: Int = Field(default=1234, description="first sample seed (sample i uses seed + i), the same for base and trained")
    batch_size: Int = Field(default=32, ge=1, description="images generated per batch")
    metrics: list[str] = Field(default_factory=list, description="extra metrics by name (sdpo_core.evaluation.metrics)")

    @field_validator("steps")
    @classmethod
    def _steps_valid(cls, v: list[int]) -> list[int]:
        if not v or any(s < 1 for s in v):
            raise ValueError(f"must be a non-empty list of positive step counts, got {v}")
        return sorted(set(v))


class RegisterConfig(_Strict):
    """The MLflow model registry (`sdpo register`; the rules are in docs/orchestration.md)."""

    model_name: str = Field(default="sdpo-model", description="MLflow registered model name")
    rule: Literal["all_steps_ci", "all_steps_mean", "mean_over_steps"] = Field(
        default="all_steps_ci",
        description="when a new version takes alias champion from the current one (else it is challenger)",
    )


class TrackingConfig(_Strict):
    """Experiment tracking (MLflow; `MLFLOW_TRACKING_URI` picks the server, a local SQLite file by default)."""

    backend: Literal["none", "mlflow"] = Field(default="mlflow", description="mlflow, or none (no tracking)")
    experiment: str = Field(default="sdpo", description="MLflow experiment name")
    log_images_every: Int = Field(
        default=10, ge=1,
        description="epochs between sample grids (RUN_DIR/samples/epoch_NNNN.png, also logged to the tracker): "
        "first-step and final x0 of the first batch's first 4 trajectories, with their rewards and prompts",
    )


# BaseModel's metaclass has an ABC ``register`` method; the design fixes ``register`` as a key.
warnings.filterwarnings("ignore", message='Field name "register"', category=UserWarning)


class Config(_Strict):
    pipeline: str = Field(default="custom", description="the pipeline's name (set from its pipelines.yaml entry)")
    seed: Int = Field(default=42, description="base seed; per-process, per-epoch seeds derive from it")
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
    trajectories_per_process: int  # x the method's trajectories per prompt
    train_items_per_process: int  # the method's items: groups of a prompt's trajectories or single ones
    train_batches_per_process: int
    optimizer_steps_per_epoch: int
    samples_per_epoch: int  # trajectories over all processes


def method_class(t: TrainConfig) -> type[Method]:
    """The class of ``train.method`` (its batch arithmetic, checks and update loop)."""
    return _methods()[t.method]


def resolve_update_schedule(t: TrainConfig) -> str:
    """``train.update_schedule`` with ``auto`` resolved to the method's own loop (``Method.update_schedule``)."""
    if t.update_schedule != "auto":
        return t.update_schedule
    return method_class(t).update_schedule


def micro_steps_per_update(cfg: Config) -> int:
    """Backward passes accumulated into one optimizer step."""
    t = cfg.train
    if resolve_update_schedule(t) == "per_step":
        return t.gradient_accumulation_steps
    return t.gradient_accumulation_steps * max(1, math.ceil(cfg.sample.num_steps * t.timestep_fraction))


def batch_plan(cfg: Config, num_processes: int = 1) -> BatchPlan:
    """Derive and check batch arithmetic (the method's own checks included); raises ConfigError
    with what to change."""
    if num_processes < 1:
        raise ConfigError(f"num_processes must be >= 1, got {num_processes}")
    s, t = cfg.sample, cfg.train
    method = method_class(t)
    try:
        method.check_batches(t, s)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    prompts = s.batch_size * s.num_batches_per_epoch
    trajectories = method.trajectories_per_prompt * prompts
    items = method.items_per_prompt() * prompts
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
    """One line (the CLI's contract for bad input): every problem, each naming its dotted key."""
    valid = _valid_keys(Config)
    problems = []
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            close = difflib.get_close_matches(path, valid, n=1, cutoff=0.6)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            problems.append(f"unknown key {path!r}{hint}")
        elif e["type"] == "missing":
            problems.append(f"missing required key {path!r}")
        else:
            got = e.get("input")
            problems.append(f"{path!r}: {e['msg']} (got {got!r})")
    return f"invalid configuration ({source}): " + "; ".join(problems)


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
        raise ConfigError(f"--set {key}: cannot read value {raw!r}: {one_line(exc)}") from exc
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
    data = read_yaml(path)
    if not isinstance(data, dict) or "pipelines" not in data or not isinstance(data["pipelines"], dict):
        raise ConfigError(f"{path}: expected a mapping with 'defaults' and 'pipelines' sections")
    unknown = set(data) - {"defaults", "pipelines"}
    if unknown:
        raise ConfigError(f"{path}: unknown top-level keys {sorted(unknown)}; expected 'defaults' and 'pipelines'")
    if not isinstance(data.get("defaults") or {}, dict):
        raise ConfigError(f"{path}: 'defaults' must be a mapping of config sections, got {_kind(data['defaults'])}")
    for name, entry in data["pipelines"].items():
        if not isinstance(name, str) or not isinstance(entry or {}, dict):
            raise ConfigError(f"{path}: pipeline {name!r} must be a name with a mapping of config sections, "
                              f"got {_kind(entry)}")
    return data


def read_yaml(path: Path) -> Any:
    """A YAML file's content; ConfigError (one line: the file, where, what) when it is not UTF-8 YAML."""
    try:
        return yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start}); "
                          "save it as UTF-8") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {one_line(exc)}") from None


def one_line(exc: BaseException) -> str:
    """An error's message on one line (YAML's errors span several): `sdpo` prints one line per error."""
    return " ".join(str(exc).split())


def _kind(value: Any) -> str:
    return f"a {type(value).__name__} ({value!r:.60})"


def pipeline_names(path: Path = DEFAULT_PIPELINES_FILE) -> list[str]:
    return list(read_pipelines_file(path)["pipelines"])


def validate_dict(raw: dict[str, Any], source: str) -> Config:
    return validate_section(Config, raw, source)


def validate_section(model: type[_S], raw: dict[str, Any], source: str) -> _S:
    """``model`` (a config section) from ``raw``, or ConfigError naming ``source`` and each bad key."""
    try:
        return model.model_validate(raw)
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
        raise ConfigError(f"{path}: no pipeline named {pipeline!r}{hint} (have: {', '.join(pipelines)})")
    raw = _deep_merge(data.get("defaults") or {}, pipelines[pipeline] or {})
    raw["pipeline"] = pipeline
    raw = apply_overrides(raw, overrides or [])
    cfg = validate_dict(raw, f"{path}, pipeline '{pipeline}'")
    batch_plan(cfg)
    check_step_counts(cfg, f"{path}, pipeline '{pipeline}'")
    check_reward(cfg, f"{path}, pipeline '{pipeline}'")
    return cfg


def check_step_counts(cfg: Config, source: str) -> None:
    """``sample.num_steps`` and ``evaluate.steps`` against the model's scheduler (``check_steps``)."""
    counts = {"sample.num_steps": [cfg.sample.num_steps], "evaluate.steps": cfg.evaluate.steps}
    check_steps(cfg.model.pretrained, cfg.sample.sampler, counts, f"invalid configuration ({source})")


def check_steps(pretrained: str, sampler: str | None, counts: dict[str, list[int]], source: str) -> None:
    """Step counts (by the key or flag that set them) against the scheduler of ``pretrained``, read
    from ``scheduler/scheduler_config.json`` when it is a local directory. A hub id or a base not
    built yet cannot be read here: its step counts are checked when its sampler is built."""
    path = Path(pretrained).expanduser() / "scheduler" / "scheduler_config.json"
    if not path.is_file():
        return
    try:
        scheduler = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc}); expected the model's scheduler config") from None
    if not isinstance(scheduler, dict):
        raise ConfigError(f"{path}: expected a JSON object (the model's scheduler config)")
    try:
        limit, why = step_limit(scheduler, sampler)
    except ValueError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    for key, values in counts.items():
        over = [n for n in values if n > limit]
        if over:
            raise ConfigError(f"{source}: '{key}': {over} exceeds {limit}, the most steps {why} ({path}); "
                              f"use at most {limit}")


def step_limit(scheduler: dict[str, Any], sampler: str | None) -> tuple[float, str]:
    """The most steps a sampler can take on this scheduler config, and why: DDIM and LCM pick their
    timesteps among ``num_train_timesteps``; LCM among its ``original_inference_steps`` too (as
    diffusers' ``set_timesteps`` does); the flow SDE has no such limit. Defaults as in diffusers."""
    is_lcm = sampler == "lcm" or (sampler is None and scheduler.get("_class_name") == "LCMScheduler")
    is_flow = sampler == "flow_sde" or (sampler is None and "FlowMatch" in str(scheduler.get("_class_name")))
    if is_flow:
        return math.inf, "of the flow sampler"
    train = scheduler.get("num_train_timesteps", 1000)
    if not isinstance(train, int) or isinstance(train, bool) or train < 1:
        raise ValueError(f"num_train_timesteps must be a whole number >= 1, got {train!r}")
    original = scheduler.get("original_inference_steps", 50)
    if is_lcm and isinstance(original, int) and original < train:
        return original, "of the LCM sampler (the scheduler's original_inference_steps)"
    return train, "the scheduler was trained with (num_train_timesteps)"


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
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config sections, got {_kind(data)}")
    return validate_dict(data, str(path))


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
