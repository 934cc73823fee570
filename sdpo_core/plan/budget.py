"""``sdpo plan``: the GPU memory budget of a training config, from the model's configs alone.

Every module is built from its ``config.json`` on the meta device (no weights, no download): the
shipped hub models' configs live in ``sdpo_core/assets/model_configs/<hub id>/``, a local model
directory is read as it is. Parameter counts are exact; dtypes follow the loader
(``families/hub.py``: every module in ``model.mixed_precision``, the denoiser float32 for a full
fine-tune, SDXL's VAE float32 in fp16 when its config forces the upcast).

Activations are *measured* on the meta device: one sample of the denoiser forward (LoRA added as the
trainer adds it, or every weight trainable for a full fine-tune) with a saved-tensor hook summing the
bytes autograd keeps for backward (parameters and views of them excluded). With gradient
checkpointing the estimate keeps, per checkpointed block (ResnetBlock2D / Transformer2DModel /
joint and single transformer blocks), only its input, plus the largest block's saved tensors (its
recomputation during backward). Both scale linearly with the micro-batch: ``train.batch_size`` x the
method's trajectories per item x 2 when classifier-free guidance doubles the batch. The VAE decode
is the float activations of one DECODE_CHUNK of images at the output resolution, counted as
``4`` live tensors the size of the largest decoder feature map (an estimate, not measured).

Sharded with FSDP over N processes (``--gpus N --fsdp``, or ``sdpo train`` under an FSDP
``accelerate launch``), the denoiser's weights, gradients and AdamW state count 1/N each, plus the
blocks gathered while they run (``sharding.py``).
"""

from __future__ import annotations

import functools
import math
import tempfile
import types
from dataclasses import dataclass
from pathlib import Path

import torch

from sdpo_core.config import Config, ConfigError, ModelConfig
from sdpo_core.families import FAMILIES, family_for
from sdpo_core.families.hub import ModelLoadError, read_json_object
from sdpo_core.families.loading import DTYPES
from sdpo_core.families.lora import add_lora
from sdpo_core.methods import build_method
from sdpo_core.plan.activations import denoiser_inputs, saved_bytes
from sdpo_core.plan.sharding import fsdp_units
from sdpo_core.tiny.build import untrained_base
from sdpo_core.training.scoring import DECODE_CHUNK

ASSETS = Path(__file__).parents[1] / "assets" / "model_configs"
GiB = 1024**3
DTYPES_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


class PlanError(ModelLoadError):
    """No configs for the model (neither a local directory, the HF cache nor shipped with the project)."""


class DoesNotFit(ConfigError):
    """``sdpo train`` refused: the configuration's budget exceeds the GPU's memory."""


@dataclass
class Budget:
    """Bytes per GPU of each part of a training step (``parts``: name -> bytes) and the peak."""

    pipeline: str
    params: dict[str, tuple[int, str]]  # component -> (parameters, dtype)
    weights: dict[str, int]
    finetune: str  # model.finetune: lora or full
    trainable: int  # LoRA or denoiser parameters trained
    optimizer: int  # float32 grads + AdamW m, v of the trained weights (and LoRA's own float32 weights)
    micro_batch: int
    activations: int  # with the configured gradient checkpointing
    activations_other: int  # with the other setting
    decode: int  # one decode chunk (DECODE_CHUNK images at most)
    checkpointing: bool
    text_freed: int  # text-encoder bytes freed by cache_prompt_embeddings
    text_bytes: int  # the text encoders' weights (what cache_prompt_embeddings would free)
    mixed_precision: str  # model.mixed_precision
    denoiser: str  # its component name: unet or transformer
    item_rows: int  # denoiser rows per training item (the micro-batch at train.batch_size 1)
    unit_params: tuple[int, int]  # FSDP units: (largest, root) parameters (plan/sharding.py)
    compute_bytes: int  # bytes per parameter of a unit gathered to run (the compute dtype)
    shards: int = 1  # processes FSDP shards the denoiser over (1: not sharded)

    @property
    def gathered(self) -> int:
        """Bytes of the FSDP units gathered whole at once (0 unsharded): the root, the running and the
        prefetched block, and a full fine-tune's float32 gradient of one block before its reduce-scatter."""
        if self.shards == 1:
            return 0
        largest, root = self.unit_params
        return (2 * largest + root) * self.compute_bytes + (largest * 4 if self.finetune == "full" else 0)

    @property
    def denoiser_share(self) -> int:
        """Bytes of the denoiser's weights per GPU (its shard and the gathered units when sharded)."""
        return math.ceil(self.weights[self.denoiser] / self.shards) + self.gathered

    @property
    def peak(self) -> int:
        others = sum(self.weights.values()) - self.weights[self.denoiser] - self.text_freed
        return (others + self.denoiser_share + math.ceil(self.optimizer / self.shards)
                + max(self.activations, self.decode))


def config_dir(pretrained: str) -> Path:
    """The directory holding ``model_index.json``: a local model, a shipped hub id, or a hub id whose
    configs are in the HF cache (never downloaded)."""
    for path in (Path(pretrained).expanduser(), ASSETS / pretrained):
        if (path / "model_index.json").is_file():
            return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(pretrained, allow_patterns=["*.json"], local_files_only=True))
    except Exception:  # not a repo id, or not in the cache: the error below says what to do
        pass
    raise PlanError(f"model.pretrained '{pretrained}': no local diffusers directory and no configs shipped in "
                    f"{ASSETS} (shipped: {', '.join(shipped_models())}); give a local model directory")


def built_or_config_dir(model_cfg, tmp: Path) -> Path:
    """``config_dir`` of ``model.pretrained``, or for a ``model.build`` not built yet its untrained
    architecture saved under ``tmp`` (the same configs ``sdpo base`` writes)."""
    try:
        return config_dir(model_cfg.pretrained)
    except PlanError:
        if model_cfg.build is None:
            raise
    return untrained_base(model_cfg.build, tmp / "base", model_cfg.build_seed)


def shipped_models() -> list[str]:
    return sorted(str(p.parent.relative_to(ASSETS)) for p in ASSETS.glob("*/*/model_index.json"))


def meta_components(model_dir: Path) -> dict[str, torch.nn.Module]:
    """Every diffusers / transformers module of ``model_index.json`` built on the meta device."""
    import diffusers
    import transformers

    index = read_json_object(model_dir / "model_index.json", "_class_name")
    out = {}
    for name, spec in index.items():
        if not (isinstance(spec, list) and len(spec) == 2 and (model_dir / name / "config.json").is_file()):
            continue
        lib, cls_name = spec
        with torch.device("meta"):
            if lib == "diffusers":
                cls = getattr(diffusers, cls_name)
                out[name] = cls.from_config(cls.load_config(model_dir / name))
            elif lib == "transformers":
                cfg = transformers.AutoConfig.from_pretrained(model_dir / name)
                out[name] = getattr(transformers, cls_name)._from_config(cfg)
    return out


def component_dtypes(m: ModelConfig, family: str, modules: dict[str, torch.nn.Module]) -> dict[str, torch.dtype]:
    """The dtype the loader gives each component (the rules of families/*.py load and the trainer)."""
    dtype = DTYPES[m.mixed_precision]
    out = {name: dtype for name in modules}
    den = "unet" if "unet" in modules else "transformer"
    out[den] = dtype if m.finetune == "lora" else torch.float32
    vae = modules.get("vae")
    if family == "sdxl" and dtype == torch.float16 and vae is not None and vae.config.get("force_upcast"):
        out["vae"] = torch.float32
    return out


@dataclass(frozen=True)
class ModelFigures:
    """What a budget needs from the model: per-component (parameters, dtype), trained parameters,
    one sample's saved activation bytes without / with checkpointing, the output side in pixels."""

    family: str
    params: tuple[tuple[str, tuple[int, str]], ...]
    trainable: int
    plain: int
    ckpt: int
    side: int
    vae_width: int  # channels of the decoder's full-resolution block
    cfg_doubles: bool  # classifier-free guidance doubles the batch (not FLUX, not an LCM UNet)
    denoiser: str  # unet or transformer
    units: tuple[int, int]  # FSDP units of the denoiser: (largest, root) parameters


@functools.lru_cache(maxsize=16)
def model_figures(model_json: str, resolution: int | None) -> ModelFigures:
    """``ModelFigures`` of a ``model`` config (as JSON: cached, a model is measured once per process)."""
    m = ModelConfig.model_validate_json(model_json)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = built_or_config_dir(m, Path(tmp))
        fam_cls = family_for(str(model_dir), m.family)
        modules = meta_components(model_dir)
    family = next(k for k, v in FAMILIES.items() if v is fam_cls)
    if family == "sd3" and m.family_options.get("use_t5") is False:
        modules.pop("text_encoder_3", None)
    modules.pop("safety_checker", None)
    dtypes = component_dtypes(m, family, modules)
    den_name = "unet" if "unet" in modules else "transformer"
    den = modules[den_name]
    for module in modules.values():
        module.requires_grad_(False)  # the loader freezes every module; the trainer then adds LoRA
    den.to(dtype=dtypes[den_name])
    # the model's own weights, counted before LoRA adds its (float32, in ``optimizer``) adapters
    params = tuple((k, (sum(p.numel() for p in v.parameters()), str(dtypes[k]).removeprefix("torch.")))
                   for k, v in modules.items())
    if m.finetune == "lora":
        holder = types.SimpleNamespace(pipe=types.SimpleNamespace(**{den_name: den}))
        add_lora(den, m.lora_rank, m.lora_alpha, m.lora_target_modules or list(fam_cls.default_lora_targets),
                 fam_cls.lora_exclude_modules(holder))
    else:
        den.requires_grad_(True)
    n_train = sum(p.numel() for p in den.parameters() if p.requires_grad)
    vae = modules["vae"].config
    factor = 2 ** (len(vae.block_out_channels) - 1)
    latent = resolution // factor if resolution else den.config.sample_size
    plain, ckpt = saved_bytes(den, denoiser_inputs(family, den, latent, dtypes[den_name]))
    doubles = family != "flux" and not den.config.get("time_cond_proj_dim")
    return ModelFigures(family, params, n_train, plain, ckpt, latent * factor, vae.block_out_channels[0], doubles,
                        den_name, fsdp_units(den))


def plan_budget(cfg: Config, name: str, shards: int = 1) -> Budget:
    """The per-GPU memory budget of training ``cfg`` (named ``name``), the denoiser sharded with FSDP
    over ``shards`` processes (1: not sharded)."""
    m = cfg.model
    f = model_figures(m.model_dump_json(), cfg.sample.resolution)
    params = dict(f.params)
    weights = {k: n * DTYPES_BYTES[d] for k, (n, d) in params.items()}
    # float32 grads + AdamW m and v; LoRA's own float32 weights too (a full fine-tune's are in ``weights``)
    optimizer = f.trainable * 4 * (3 if m.finetune == "full" else 4)
    method = build_method(cfg.train, cfg.sample.num_steps)
    doubled = cfg.sample.guidance_scale > 1 and f.cfg_doubles
    rows = method.trajectories_per_item * (2 if doubled else 1)
    micro = cfg.train.batch_size * rows
    on, off = (f.ckpt, f.plain) if m.gradient_checkpointing else (f.plain, f.ckpt)
    # the decoder's largest feature map (its first block's width at full resolution), 4 alive at once
    images = min(DECODE_CHUNK, cfg.sample.batch_size * method.trajectories_per_prompt * cfg.sample.num_batches_per_epoch)
    decode = images * 4 * f.vae_width * f.side**2 * DTYPES_BYTES[params["vae"][1]]
    text = sum(w for k, w in weights.items() if k.startswith("text_encoder"))
    compute = DTYPES[m.mixed_precision].itemsize  # FSDP's mixed-precision policy gathers in it
    return Budget(name, params, weights, m.finetune, f.trainable, optimizer, micro, on * micro, off * micro,
                  decode, m.gradient_checkpointing, text if m.cache_prompt_embeddings else 0, text,
                  m.mixed_precision, f.denoiser, rows, f.units, compute, shards)
