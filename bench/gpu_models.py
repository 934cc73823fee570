"""Random-weight diffusers pipelines shaped like SD-Turbo, SDXL-Turbo, SD3.5-Large-Turbo and
FLUX.1-schnell, built in code from their public configs (no download), for ``bench/gpu.py``. The
denoiser and VAE configs are the files shipped in ``sdpo_core/assets/model_configs`` (``sdpo plan``
reads the same ones, with the full-size text encoders).

The denoiser (UNet / transformer) and the VAE have the released models' configs; the text
encoders keep only what the denoiser's input dimensions fix (hidden / projection widths, the
77-token CLIP context) and have one layer, because the denoiser is what the benchmark measures.
SD3.5 is built without T5 (``text_encoder_3=None``: the pipeline feeds zeros of T5's width and
length in its place, the same sequence length the transformer sees with T5). FLUX needs a T5 whose
``d_model`` is the transformer's ``joint_attention_dim`` (4096): one layer, 2 heads of 64 and a
256-wide feed-forward (~4M parameters). ``smoke=True`` gives the tiny test pipelines of each family
(``sdpo_core/tiny``) instead.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    EulerAncestralDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from sdpo_core.plan import ASSETS
from sdpo_core.tiny.flow import FLUX_SCHEDULER, build_t5_tokenizer
from sdpo_core.tiny.random_model import SD_TURBO_SCHEDULER
from sdpo_core.tiny.tokenizer import build_tokenizer

WORDS = "a an the photo of picture cat dog horse cow pig bird fish rabbit in on grass field".split()
CLIP_LENGTH = 77

def _config(repo: str, component: str) -> dict:
    """A component's config.json as shipped in sdpo_core/assets/model_configs (``sdpo plan`` reads
    the same files), without diffusers' ``_class_name``."""
    path = ASSETS / repo / component / "config.json"
    return {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}


SD_TURBO_UNET = _config("stabilityai/sd-turbo", "unet")  # the SD 2.1-base UNet, 866M parameters
SDXL_TURBO_UNET = _config("stabilityai/sdxl-turbo", "unet")  # the SDXL UNet, 2.57B parameters
# scheduler/scheduler_config.json of sdxl-turbo
SDXL_TURBO_SCHEDULER = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    prediction_type="epsilon", timestep_spacing="trailing", steps_offset=1,
)
SD35_LARGE_TRANSFORMER = _config("stabilityai/stable-diffusion-3.5-large-turbo", "transformer")  # 8.1B
FLUX_SCHNELL_TRANSFORMER = _config("black-forest-labs/FLUX.1-schnell", "transformer")  # 11.9B
# the VAEs: SD / SDXL (4 latent channels) and SD3 / FLUX (16 channels, no quant convs)
VAES = {
    "sd": _config("stabilityai/sd-turbo", "vae"),
    "sdxl": _config("stabilityai/sdxl-turbo", "vae"),
    "sd3": _config("stabilityai/stable-diffusion-3.5-large-turbo", "vae"),
    "flux": _config("black-forest-labs/FLUX.1-schnell", "vae"),
}


@dataclass(frozen=True)
class Case:
    """One benchmarked model: its pipeline builder and the settings of its model card."""

    family: str  # the sdpo family the trainer should read from model_index.json
    resolution: int  # px, the model card's
    steps: int  # denoising steps the model card samples with (few-step models)
    build: Callable[[torch.device], object]  # the full-size random pipeline, modules made on the device
    build_smoke: Callable[[], object]  # the tiny pipeline of the same family
    smoke_resolution: int | None = None  # None: the tiny pipeline's default


def _clip_tokenizer():
    with tempfile.TemporaryDirectory() as tmp:
        return build_tokenizer(WORDS, tmp, max_length=CLIP_LENGTH)


def _clip(tok, hidden: int, projection: int | None = None):
    """A one-layer CLIP text encoder of width ``hidden`` (with a projection when given)."""
    cfg = CLIPTextConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=1,
        num_attention_heads=hidden // 64, max_position_embeddings=CLIP_LENGTH, projection_dim=projection or hidden,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    return CLIPTextModelWithProjection(cfg) if projection else CLIPTextModel(cfg)


def _vae(kind: str) -> AutoencoderKL:
    return AutoencoderKL(**VAES[kind])


# Each builder makes its modules under ``torch.device(device)`` (initialised there) and everything
# else outside it: schedulers compute their tables with numpy, which a device context breaks.
def sd_turbo(device):
    tok = _clip_tokenizer()
    with torch.device(device):
        m = dict(vae=_vae("sd"), text_encoder=_clip(tok, 1024), unet=UNet2DConditionModel(**SD_TURBO_UNET))
    return StableDiffusionPipeline(
        **m, tokenizer=tok, scheduler=DDIMScheduler(**SD_TURBO_SCHEDULER), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )


def sdxl_turbo(device):
    tok = _clip_tokenizer()
    with torch.device(device):
        m = dict(vae=_vae("sdxl"), text_encoder=_clip(tok, 768), text_encoder_2=_clip(tok, 1280, projection=1280),
                 unet=UNet2DConditionModel(**SDXL_TURBO_UNET))
    return StableDiffusionXLPipeline(
        **m, tokenizer=tok, tokenizer_2=tok,
        scheduler=EulerAncestralDiscreteScheduler(**SDXL_TURBO_SCHEDULER), force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )


def sd35_large_turbo(device):
    tok = _clip_tokenizer()
    with torch.device(device):
        m = dict(transformer=SD3Transformer2DModel(**SD35_LARGE_TRANSFORMER), vae=_vae("sd3"),
                 text_encoder=_clip(tok, 768, projection=768), text_encoder_2=_clip(tok, 1280, projection=1280))
    return StableDiffusion3Pipeline(
        **m, scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0), tokenizer=tok,
        tokenizer_2=tok, text_encoder_3=None, tokenizer_3=None,
    )


def flux_schnell(device):
    tok = _clip_tokenizer()
    tok5 = build_t5_tokenizer([" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))])
    t5_cfg = T5Config(
        d_model=FLUX_SCHNELL_TRANSFORMER["joint_attention_dim"], d_ff=256, d_kv=64, num_layers=1, num_heads=2,
        vocab_size=len(tok5), feed_forward_proj="gated-gelu", pad_token_id=tok5.pad_token_id,
        eos_token_id=tok5.eos_token_id, decoder_start_token_id=0,
    )
    with torch.device(device):
        m = dict(transformer=FluxTransformer2DModel(**FLUX_SCHNELL_TRANSFORMER), vae=_vae("flux"),
                 text_encoder=_clip(tok, 768), text_encoder_2=T5EncoderModel(t5_cfg))
    return FluxPipeline(
        **m, scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER), tokenizer=tok, tokenizer_2=tok5,
    )


def _tiny_sd():
    from sdpo_core.tiny.random_model import RANDOM_TINY_WORDS, TinySizes, build_tiny_pipeline

    return build_tiny_pipeline(TinySizes(words=RANDOM_TINY_WORDS))


def _tiny_sdxl():
    from sdpo_core.tiny.families import build_tiny_sdxl_pipeline
    from sdpo_core.tiny.random_model import RANDOM_TINY_WORDS

    return build_tiny_sdxl_pipeline(RANDOM_TINY_WORDS)


def _tiny_sd3():
    from sdpo_core.tiny.flow import build_tiny_sd3

    return build_tiny_sd3()


def _tiny_flux():
    from sdpo_core.tiny.flow import build_tiny_flux

    return build_tiny_flux()


CASES: dict[str, Case] = {
    "sd-turbo": Case("sd", 512, 4, sd_turbo, _tiny_sd),
    "sdxl-turbo": Case("sdxl", 512, 4, sdxl_turbo, _tiny_sdxl),
    "sd35-large-turbo": Case("sd3", 1024, 4, sd35_large_turbo, _tiny_sd3),
    # FluxPipeline's default size is 128 x vae scale (512 px for the tiny VAE): ask for the tiny 32 px
    "flux-schnell": Case("flux", 1024, 4, flux_schnell, _tiny_flux, smoke_resolution=32),
}


def build_pipeline(case: Case, smoke: bool, device: torch.device, dtype: torch.dtype):
    """The case's random pipeline: modules initialised on ``device`` (a 12B transformer initialises
    in seconds on a GPU, minutes on a CPU) and cast to ``dtype`` (what is saved and later loaded)."""
    torch.manual_seed(0)
    if smoke:
        return case.build_smoke()
    pipe = case.build(device)
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.to(dtype=dtype)
    return pipe
