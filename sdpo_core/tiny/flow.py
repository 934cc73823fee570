"""Tiny flow-matching pipelines built in code (no download): ``StableDiffusion3Pipeline`` and
``FluxPipeline`` with the classes the real SD3 / SD3.5 and FLUX.1-schnell use.

Both make 32x32 RGB images through a 16-channel AutoencoderKL with scale factor 4 (8x8x16
latents, ``shift_factor`` / ``scaling_factor`` set as the real VAEs have them) and a
``FlowMatchEulerDiscreteScheduler``.

- SD3: two ``CLIPTextModelWithProjection`` encoders (hidden 32 each: ``joint_attention_dim`` 64 =
  their concatenated hidden states, ``pooled_projection_dim`` 64 = their concatenated pooled
  projections), no T5 (``text_encoder_3=None``; load with ``from_pretrained(dir,
  text_encoder_3=None, tokenizer_3=None)``), an ``SD3Transformer2DModel`` with patch 2.
- FLUX: ``CLIPTextModel`` (pooled, 32) + a tiny ``T5EncoderModel`` whose tokenizer is a Unigram
  model trained here on a few sentences, a ``FluxTransformer2DModel`` on 2x2-packed latents
  (in_channels 64 = 16 x 4).
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

from sdpo_core.tiny.tokenizer import build_tokenizer

LATENT_CHANNELS = 16
TEXT_HIDDEN = 32
MAX_LENGTH = 32  # CLIP tokens; T5 sequences are at most this long too
# SD3's scheduler (shift 3, no dynamic shifting) and FLUX.1-schnell's (shift 1; FLUX.1-dev turns
# on dynamic shifting, which ``dynamic_shifting=True`` mirrors)
SD3_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0)
FLUX_SCHEDULER = dict(
    num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False, base_shift=0.5, max_shift=1.15,
    base_image_seq_len=256, max_image_seq_len=4096,
)
DEFAULT_WORDS = ("a", "photo", "of", "cat", "dog", "red", "blue", "digit", "one", "two")


def tiny_vae(image_size: int = 32, channels: Sequence[int] = (16, 32, 32),
             latent_channels: int = LATENT_CHANNELS) -> AutoencoderKL:
    """A 16-channel AutoencoderKL without quant convs (SD3 / FLUX layout), scale factor 2^(L-1)."""
    return AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(channels),
        up_block_types=("UpDecoderBlock2D",) * len(channels),
        block_out_channels=tuple(channels), layers_per_block=1, latent_channels=latent_channels,
        norm_num_groups=8, sample_size=image_size, scaling_factor=1.5, shift_factor=0.1,
        use_quant_conv=False, use_post_quant_conv=False,
    )


def _clip_config(tokenizer) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=TEXT_HIDDEN, intermediate_size=TEXT_HIDDEN * 2,
        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=MAX_LENGTH,
        projection_dim=TEXT_HIDDEN, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )


def _clip_tokenizer(words: Sequence[str]):
    with tempfile.TemporaryDirectory() as tmp:
        return build_tokenizer(list(words), tmp, max_length=MAX_LENGTH)


def build_tiny_sd3(seed: int = 0, words: Sequence[str] = DEFAULT_WORDS, latent_channels: int = LATENT_CHANNELS,
                   patch_size: int = 2, num_layers: int = 2, attention_head_dim: int = 8,
                   num_attention_heads: int = 4, shift: float = SD3_SCHEDULER["shift"]) -> StableDiffusion3Pipeline:
    """A randomly initialised tiny SD3 pipeline without T5 (deterministic for ``seed``); the
    defaults are the test size, digits-flow-tiny passes a larger transformer."""
    torch.manual_seed(seed)
    tok1, tok2 = _clip_tokenizer(words), _clip_tokenizer(words)
    enc1 = CLIPTextModelWithProjection(_clip_config(tok1))
    enc2 = CLIPTextModelWithProjection(_clip_config(tok2))
    inner = attention_head_dim * num_attention_heads
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=patch_size, in_channels=latent_channels, out_channels=latent_channels,
        num_layers=num_layers, attention_head_dim=attention_head_dim, num_attention_heads=num_attention_heads,
        caption_projection_dim=inner, joint_attention_dim=2 * TEXT_HIDDEN, pooled_projection_dim=2 * TEXT_HIDDEN,
        pos_embed_max_size=16,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(**{**SD3_SCHEDULER, "shift": shift})
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=scheduler, vae=tiny_vae(latent_channels=latent_channels),
        text_encoder=enc1, tokenizer=tok1, text_encoder_2=enc2, tokenizer_2=tok2,
        text_encoder_3=None, tokenizer_3=None,
    )


def build_t5_tokenizer(sentences: Sequence[str], vocab_size: int = 64) -> T5TokenizerFast:
    """A T5TokenizerFast over a Unigram model trained here on ``sentences`` (appends ``</s>``)."""
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>"
    )
    tok.train_from_iterator(list(sentences), trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", tok.token_to_id("</s>"))]
    )
    return T5TokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", extra_ids=0,
        model_max_length=MAX_LENGTH,
    )


def build_tiny_flux(seed: int = 0, words: Sequence[str] = DEFAULT_WORDS,
                    dynamic_shifting: bool = False) -> FluxPipeline:
    """A randomly initialised tiny FLUX.1-schnell-layout pipeline (deterministic for ``seed``)."""
    torch.manual_seed(seed)
    tok = _clip_tokenizer(words)
    enc = CLIPTextModel(_clip_config(tok))
    sentences = [" ".join(words[i:] + words[:i]) for i in range(len(words))]
    tok5 = build_t5_tokenizer(sentences)
    enc5 = T5EncoderModel(T5Config(
        d_model=TEXT_HIDDEN, d_ff=37, d_kv=8, num_layers=2, num_heads=4, vocab_size=len(tok5),
        pad_token_id=tok5.pad_token_id, eos_token_id=tok5.eos_token_id, decoder_start_token_id=0,
    ))
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4 * LATENT_CHANNELS, num_layers=1, num_single_layers=1,
        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=TEXT_HIDDEN,
        pooled_projection_dim=TEXT_HIDDEN, guidance_embeds=False, axes_dims_rope=(2, 2, 4),
    )
    scheduler = FlowMatchEulerDiscreteScheduler(**{**FLUX_SCHEDULER, "use_dynamic_shifting": dynamic_shifting})
    return FluxPipeline(
        transformer=transformer, scheduler=scheduler, vae=tiny_vae(),
        text_encoder=enc, tokenizer=tok, text_encoder_2=enc5, tokenizer_2=tok5,
    )
