"""The four model-based rewards, driven through their real loading code with tiny random weights.

Each model is built from its published architecture (dims below, from the authors' configs)
shrunk to width 32 and 2 layers, saved the way users' weights are saved (``save_pretrained`` /
safetensors, or the published pickle layout run through ``sdpo_core.rewards.convert``), then
loaded by ``build_reward`` exactly as a training run does. No downloads (HF_HUB_OFFLINE=1).

Published dims, for reference (what is shrunk):
  - LAION aesthetic: CLIP ViT-L/14 image tower (hidden 1024, 24 layers, 16 heads, patch 14,
    224 px, projection 768) + MLP 768-1024-128-64-16-1.
  - PickScore / HPSv2: CLIP ViT-H/14 (image: hidden 1280, 32 layers, 16 heads, patch 14;
    text: hidden 1024, 24 layers, 16 heads, 77 tokens; projection 1024), GELU activations.
  - ImageReward: BLIP with ViT-L/16 (hidden 1024, 24 layers, 16 heads, LayerNorm eps 1e-6) and
    BERT-base (hidden 768, 12 layers, 12 heads, vocab 30524) cross-attending to the image
    tokens, + the same MLP head on 768 features.
"""

from __future__ import annotations

import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from torch.nn import functional as F

from sdpo_core.rewards import RewardError, build_reward
from sdpo_core.rewards import convert as conv
from sdpo_core.rewards.clip_common import CLIP_MEAN, CLIP_STD, clip_preprocess
from sdpo_core.rewards.imagereward import MEAN as IR_MEAN
from sdpo_core.rewards.imagereward import STD as IR_STD
from sdpo_core.rewards.imagereward import ImageRewardModel

WORDS = ["a", "photo", "of", "cat", "dog", "red", "blue", "car", "tree", "painting"]
PROMPTS = ["a photo of a cat", "a red car", "a blue tree painting", "dog"]
SIZES = [(32, 32), (64, 48), (300, 200)]  # (W, H) as people say it; tensors are (N, 3, H, W)


def _randomize(module: torch.nn.Module, seed: int, std: float = 0.1) -> None:
    """Small random weights everywhere (transformers' inits leave e.g. BLIP's ViT near zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g) * std
            is_norm = "norm" in name.lower() and name.endswith("weight")
            p.copy_(1.0 + noise if is_norm else noise)


def _images(w: int, h: int, n: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


def _check_scorer(reward) -> None:
    """Shapes, dtype, determinism and batch-size invariance on images of several sizes."""
    for w, h in SIZES:
        images = _images(w, h)
        scores = reward(images, PROMPTS)
        assert scores.shape == (4,) and scores.dtype == torch.float32
        assert torch.isfinite(scores).all()
        assert scores.std() > 0, "the score must depend on the image"
        torch.testing.assert_close(reward(images, PROMPTS), scores, rtol=0, atol=0)
        singles = torch.cat([reward(images[i : i + 1], PROMPTS[i : i + 1]) for i in range(4)])
        torch.testing.assert_close(singles, scores, rtol=1e-6, atol=1e-5)


# ------------------------------------------------------------------ fixtures: tiny real architectures


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Width-32 models gain nothing from threads, and on a busy 2-core machine extra threads
    made each call 30x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def clip_tokenizer(tmp_path_factory):
    from sdpo_core.tiny.tokenizer import build_tokenizer

    return build_tokenizer(WORDS, tmp_path_factory.mktemp("cliptok"), max_length=77)


def _tiny_clip(tokenizer, seed: int):
    """CLIP ViT-x/14 shrunk: 224 px, patch 14, width 32, 2 layers, 4 heads, projection 16, GELU."""
    from transformers import CLIPConfig, CLIPModel

    vision = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=224,
        patch_size=14,
        hidden_act="gelu",
    )
    text = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=len(tokenizer),
        max_position_embeddings=77,
        hidden_act="gelu",
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        pad_token_id=None,
    )
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    _randomize(model, seed)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(100.0))  # the published PickScore/CLIP value
    return model.eval()


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory, clip_tokenizer):
    """A CLIPModel directory as ``save_pretrained`` writes it (PickScore's published layout)."""
    out = tmp_path_factory.mktemp("clip")
    _tiny_clip(clip_tokenizer, seed=1).save_pretrained(str(out))
    clip_tokenizer.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def bert_tokenizer_dir(tmp_path_factory):
    from transformers import BertTokenizer

    out = tmp_path_factory.mktemp("berttok")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    (out / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizer(str(out / "vocab.txt")).save_pretrained(str(out))
    return out


def _tiny_blip_config(vocab_size: int):
    """ImageReward's BLIP (ViT-L/16 + BERT-base) shrunk to width 32, 2 layers, 4 heads, 224 px."""
    from transformers import BlipConfig

    vision = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=224,
        patch_size=16,
        layer_norm_eps=1e-6,
    )
    text = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=vocab_size,
        max_position_embeddings=40,
        is_decoder=True,
        bos_token_id=None,
        sep_token_id=None,
        pad_token_id=0,
    )
    return BlipConfig(vision_config=vision, text_config=text)


# ------------------------------------------------------------------ preprocessing


def test_gray_image_normalises_to_known_values():
    # 0.5 gray stays 0.5 through any resize (the kernel sums to 1), so each channel is
    # (0.5 - mean_c) / std_c = (0.5 - 0.48145466) / 0.26862954 = 0.0690369 (R),
    # (0.5 - 0.4578275) / 0.26130258 = 0.1613934 (G), (0.5 - 0.40821073) / 0.27577711 = 0.3328386 (B).
    for w, h in SIZES:
        out = clip_preprocess(torch.full((2, 3, h, w), 0.5))
        assert out.shape == (2, 3, 224, 224) and out.dtype == torch.float32
        for c, want in enumerate([0.0690369, 0.1613934, 0.3328386]):
            torch.testing.assert_close(out[:, c], torch.full_like(out[:, c], want), rtol=0, atol=1e-6)
    assert CLIP_MEAN == (0.48145466, 0.4578275, 0.40821073) and CLIP_STD == (
        0.26862954,
        0.26130258,
        0.27577711,
    )


def test_resize_and_crop_match_pil_bicubic():
    """Same geometry as torchvision Resize(224, BICUBIC) + CenterCrop(224) on a PIL image."""
    import numpy as np
    from PIL import Image

    from sdpo_core.rewards.clip_common import resize_center_crop

    arr = (torch.rand(200, 300, 3, generator=torch.Generator().manual_seed(0)) * 255).round().to(torch.uint8)
    resized = Image.fromarray(arr.numpy()).resize((336, 224), Image.BICUBIC)  # short side 200 -> 224
    ref = torch.from_numpy(np.array(resized.crop((56, 0, 280, 224)))).permute(2, 0, 1).float() / 255
    out = resize_center_crop(arr.permute(2, 0, 1)[None].float() / 255)[0]
    # PIL rounds to uint8 between its two passes; on pure noise that is under one grey level on average.
    assert (out - ref).abs().mean() < 1 / 255


# ------------------------------------------------------------------ aesthetic


@pytest.fixture(scope="module")
def aesthetic_dir(tmp_path_factory, clip_tokenizer):
    """The published layout: the head as a .pth state dict (converted here) + CLIP in ``clip/``."""
    from sdpo_core.rewards.clip_common import PreferenceHead

    root = tmp_path_factory.mktemp("aesthetic")
    _tiny_clip(clip_tokenizer, seed=2).save_pretrained(str(root / "out" / "clip"))
    head = PreferenceHead(16)
    _randomize(head, seed=3, std=0.3)
    torch.save(head.state_dict(), root / "sac+logos+ava1-l14-linearMSE.pth")
    assert conv.main(["aesthetic", str(root / "sac+logos+ava1-l14-linearMSE.pth"), str(root / "out")]) == 0
    return root / "out"


def test_aesthetic_scores(aesthetic_dir):
    _check_scorer(build_reward("aesthetic", {"path": str(aesthetic_dir), "batch_size": 3}))


def test_aesthetic_is_head_of_normalised_embedding(aesthetic_dir, tmp_path):
    """A head that reads out w . e/||e|| (identity blocks, then w) gives exactly that."""
    from safetensors.torch import save_file
    from transformers import CLIPModel

    w = torch.randn(16, generator=torch.Generator().manual_seed(4))
    eye = [torch.eye(o, i) for o, i in ((1024, 16), (128, 1024), (64, 128), (16, 64))]
    state = {f"layers.{k}.weight": m for k, m in zip((0, 2, 4, 6), eye, strict=True)}
    state |= {f"layers.{k}.bias": torch.zeros(m.shape[0]) for k, m in zip((0, 2, 4, 6), eye, strict=True)}
    state |= {"layers.7.weight": w[None], "layers.7.bias": torch.zeros(1)}
    save_file(state, str(tmp_path / "aesthetic_head.safetensors"))
    reward = build_reward("aesthetic", {"path": str(tmp_path), "clip_path": str(aesthetic_dir / "clip")})
    images = _images(64, 48)
    clip = CLIPModel.from_pretrained(str(aesthetic_dir / "clip")).eval()
    with torch.no_grad():
        e = clip.visual_projection(clip.vision_model(pixel_values=clip_preprocess(images)).pooler_output)
    torch.testing.assert_close(
        reward(images, PROMPTS), (e / e.norm(dim=-1, keepdim=True)) @ w, rtol=0, atol=1e-5
    )


# ------------------------------------------------------------------ pickscore + hpsv2


def test_pickscore_scores(clip_dir):
    _check_scorer(build_reward("pickscore", {"path": str(clip_dir), "batch_size": 3}))


def test_pickscore_is_logit_scale_times_hpsv2_cosine(clip_dir):
    """Same CLIP weights: PickScore = logit_scale.exp() (100) * the cosine HPSv2 reports; prompts matter."""
    images = _images(64, 48)
    pick = build_reward("pickscore", {"path": str(clip_dir)})(images, PROMPTS)
    cos = build_reward("hpsv2", {"path": str(clip_dir)})(images, PROMPTS)
    torch.testing.assert_close(pick, 100.0 * cos, rtol=1e-5, atol=1e-4)
    assert cos.abs().max() <= 1.0
    other = build_reward("hpsv2", {"path": str(clip_dir)})(images, PROMPTS[::-1])
    assert not torch.allclose(cos, other)


def _to_openclip(model) -> dict[str, torch.Tensor]:
    """Write a transformers CLIP back in OpenCLIP's names (the layout of HPSv2's .pt)."""
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    out = {
        "visual.proj": sd.pop("visual_projection.weight").T,
        "text_projection": sd.pop("text_projection.weight").T,
        "logit_scale": sd.pop("logit_scale"),
    }
    for hf, oc in (("vision_model.", "visual."), ("text_model.", "")):
        for i in range(2):
            p = f"{hf}encoder.layers.{i}."
            q = f"{oc}transformer.resblocks.{i}."
            for kind in ("weight", "bias"):
                out[f"{q}attn.in_proj_{kind}"] = torch.cat(
                    [sd.pop(f"{p}self_attn.{x}_proj.{kind}") for x in "qkv"]
                )
                for a, b in (
                    ("self_attn.out_proj", "attn.out_proj"),
                    ("layer_norm1", "ln_1"),
                    ("layer_norm2", "ln_2"),
                    ("mlp.fc1", "mlp.c_fc"),
                    ("mlp.fc2", "mlp.c_proj"),
                ):
                    out[f"{q}{b}.{kind}"] = sd.pop(f"{p}{a}.{kind}")
    names = {
        "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
        "vision_model.embeddings.class_embedding": "visual.class_embedding",
        "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
        "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
        "text_model.embeddings.position_embedding.weight": "positional_embedding",
    }
    for k in list(sd):
        for hf, oc in (
            ("vision_model.pre_layrnorm", "visual.ln_pre"),
            ("vision_model.post_layernorm", "visual.ln_post"),
            ("text_model.final_layer_norm", "ln_final"),
        ):
            if k.startswith(hf):
                out[k.replace(hf, oc)] = sd.pop(k)
        if k in names:
            out[names[k]] = sd.pop(k)
    assert not sd, f"unmapped: {list(sd)}"
    return out


def _openclip_block(x: torch.Tensor, sd: dict, p: str, heads: int, mask: torch.Tensor | None) -> torch.Tensor:
    """OpenCLIP's ResidualAttentionBlock (pre-LN, nn.MultiheadAttention's packed in_proj, GELU MLP)."""
    n, length, d = x.shape
    h = F.layer_norm(x, (d,), sd[p + "ln_1.weight"], sd[p + "ln_1.bias"])
    q, k, v = F.linear(h, sd[p + "attn.in_proj_weight"], sd[p + "attn.in_proj_bias"]).chunk(3, dim=-1)
    q, k, v = (t.reshape(n, length, heads, d // heads).transpose(1, 2) for t in (q, k, v))
    att = q @ k.transpose(-1, -2) / math.sqrt(d // heads)
    att = (att + mask if mask is not None else att).softmax(-1) @ v
    x = x + F.linear(
        att.transpose(1, 2).reshape(n, length, d),
        sd[p + "attn.out_proj.weight"],
        sd[p + "attn.out_proj.bias"],
    )
    h = F.layer_norm(x, (d,), sd[p + "ln_2.weight"], sd[p + "ln_2.bias"])
    h = F.linear(
        F.gelu(F.linear(h, sd[p + "mlp.c_fc.weight"], sd[p + "mlp.c_fc.bias"])),
        sd[p + "mlp.c_proj.weight"],
        sd[p + "mlp.c_proj.bias"],
    )
    return x + h


def _openclip_score(sd: dict, pixels: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """HPSv2's score computed on OpenCLIP-named weights: cos(encode_image, encode_text)."""
    x = F.conv2d(pixels, sd["visual.conv1.weight"], stride=14).flatten(2).transpose(1, 2)
    cls = sd["visual.class_embedding"].expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], 1) + sd["visual.positional_embedding"]
    x = F.layer_norm(x, (32,), sd["visual.ln_pre.weight"], sd["visual.ln_pre.bias"])
    for i in range(2):
        x = _openclip_block(x, sd, f"visual.transformer.resblocks.{i}.", 4, None)
    img = (
        F.layer_norm(x[:, 0], (32,), sd["visual.ln_post.weight"], sd["visual.ln_post.bias"])
        @ sd["visual.proj"]
    )
    t = sd["token_embedding.weight"][ids] + sd["positional_embedding"][: ids.shape[1]]
    causal = torch.full((ids.shape[1], ids.shape[1]), float("-inf")).triu(1)
    for i in range(2):
        t = _openclip_block(t, sd, f"transformer.resblocks.{i}.", 4, causal)
    t = F.layer_norm(t, (32,), sd["ln_final.weight"], sd["ln_final.bias"])
    txt = t[torch.arange(ids.shape[0]), ids.argmax(-1)] @ sd["text_projection"]
    return F.cosine_similarity(img, txt, dim=-1)


def test_hpsv2_conversion_matches_openclip_math(tmp_path, clip_tokenizer):
    """Convert an OpenCLIP-layout checkpoint; the converted reward equals OpenCLIP's own forward."""
    sd = _to_openclip(_tiny_clip(clip_tokenizer, seed=5))
    torch.save({"epoch": 3, "state_dict": sd}, tmp_path / "HPS_v2_compressed.pt")  # the published wrapping
    clip_tokenizer.save_pretrained(str(tmp_path / "tok"))
    argv = [
        "hpsv2",
        str(tmp_path / "HPS_v2_compressed.pt"),
        str(tmp_path / "out"),
        "--tokenizer",
        str(tmp_path / "tok"),
        "--vision-heads",
        "4",
        "--text-heads",
        "4",
    ]
    assert conv.main(argv) == 0
    reward = build_reward("hpsv2", {"path": str(tmp_path / "out"), "batch_size": 3})
    _check_scorer(reward)
    images = _images(300, 200)
    ids = clip_tokenizer(PROMPTS, padding="max_length", max_length=77, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        want = _openclip_score(sd, clip_preprocess(images), ids)
    torch.testing.assert_close(reward(images, PROMPTS), want, rtol=0, atol=1e-5)


# ------------------------------------------------------------------ imagereward


def _to_published_imagereward(model: ImageRewardModel) -> dict[str, torch.Tensor]:
    """Write the model in ImageReward.pt's names (BLIP's timm-style ViT, ``blip.`` prefix, extras)."""
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    out = {
        k.replace("text_encoder.", "blip.text_encoder.", 1): sd.pop(k)
        for k in list(sd)
        if k.startswith("text_encoder.")
    }
    out |= {k: sd.pop(k) for k in list(sd) if k.startswith("mlp.")}
    v = "vision_model."
    out["blip.visual_encoder.cls_token"] = sd.pop(v + "embeddings.class_embedding")
    out["blip.visual_encoder.pos_embed"] = sd.pop(v + "embeddings.position_embedding")
    for kind in ("weight", "bias"):
        out[f"blip.visual_encoder.patch_embed.proj.{kind}"] = sd.pop(f"{v}embeddings.patch_embedding.{kind}")
        out[f"blip.visual_encoder.norm.{kind}"] = sd.pop(f"{v}post_layernorm.{kind}")
        for i in range(2):
            for a, b in (
                ("layer_norm1", "norm1"),
                ("layer_norm2", "norm2"),
                ("self_attn.qkv", "attn.qkv"),
                ("self_attn.projection", "attn.proj"),
                ("mlp.fc1", "mlp.fc1"),
                ("mlp.fc2", "mlp.fc2"),
            ):
                out[f"blip.visual_encoder.blocks.{i}.{b}.{kind}"] = sd.pop(
                    f"{v}encoder.layers.{i}.{a}.{kind}"
                )
    assert not sd, f"unmapped: {list(sd)}"
    # Present in the published file, unused by the score.
    out |= {"blip.vision_proj.weight": torch.zeros(8, 32), "blip.text_proj.weight": torch.zeros(8, 32)}
    return out


def _blip_vit_reference(sd: dict, pixels: torch.Tensor) -> torch.Tensor:
    """BLIP's VisionTransformer (timm-style) on published names -> (N, 1 + P, D) normed tokens."""
    p = "blip.visual_encoder."
    x = F.conv2d(pixels, sd[p + "patch_embed.proj.weight"], sd[p + "patch_embed.proj.bias"], stride=16)
    x = (
        torch.cat([sd[p + "cls_token"].expand(x.shape[0], -1, -1), x.flatten(2).transpose(1, 2)], 1)
        + sd[p + "pos_embed"]
    )
    for i in range(2):
        b = f"{p}blocks.{i}."
        h = F.layer_norm(x, (32,), sd[b + "norm1.weight"], sd[b + "norm1.bias"], eps=1e-6)
        n, length, _ = h.shape
        qkv = F.linear(h, sd[b + "attn.qkv.weight"], sd[b + "attn.qkv.bias"]).reshape(n, length, 3, 4, 8)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        att = ((q @ k.transpose(-1, -2)) * 8**-0.5).softmax(-1) @ v
        x = x + F.linear(
            att.transpose(1, 2).reshape(n, length, 32), sd[b + "attn.proj.weight"], sd[b + "attn.proj.bias"]
        )
        h = F.layer_norm(x, (32,), sd[b + "norm2.weight"], sd[b + "norm2.bias"], eps=1e-6)
        x = x + F.linear(
            F.gelu(F.linear(h, sd[b + "mlp.fc1.weight"], sd[b + "mlp.fc1.bias"])),
            sd[b + "mlp.fc2.weight"],
            sd[b + "mlp.fc2.bias"],
        )
    return F.layer_norm(x, (32,), sd[p + "norm.weight"], sd[p + "norm.bias"], eps=1e-6)


@pytest.fixture(scope="module")
def imagereward_case(tmp_path_factory, bert_tokenizer_dir):
    """(published-layout state dict, converted directory)."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("imagereward")
    model = ImageRewardModel(_tiny_blip_config(len(AutoTokenizer.from_pretrained(str(bert_tokenizer_dir)))))
    _randomize(model, seed=6, std=0.2)
    published = _to_published_imagereward(model)
    torch.save(published, root / "ImageReward.pt")
    argv = [
        "imagereward",
        str(root / "ImageReward.pt"),
        str(root / "out"),
        "--tokenizer",
        str(bert_tokenizer_dir),
        "--vision-heads",
        "4",
        "--text-heads",
        "4",
    ]
    assert conv.main(argv) == 0
    return published, root / "out"


def test_imagereward_scores(imagereward_case):
    _check_scorer(build_reward("imagereward", {"path": str(imagereward_case[1]), "batch_size": 3}))


def test_imagereward_vision_conversion_matches_blip_vit(imagereward_case):
    from sdpo_core.rewards.imagereward import load_model

    published, out = imagereward_case
    pixels = clip_preprocess(_images(64, 48))
    with torch.no_grad():
        got = load_model(str(out)).vision_model(pixel_values=pixels).last_hidden_state
        want = _blip_vit_reference(published, pixels)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_imagereward_normalises_head_output_as_published(imagereward_case, tmp_path):
    """A head that outputs the constant b gives (b - 0.16717362830052426) / 1.0333394966054072."""
    import shutil

    from safetensors.torch import load_file, save_file

    out = tmp_path / "ir"
    shutil.copytree(imagereward_case[1], out)
    state = load_file(str(out / "model.safetensors"))
    state = {k: torch.zeros_like(v) if k.startswith("mlp.") else v for k, v in state.items()}
    state["mlp.layers.7.bias"] = torch.tensor([2.5])
    save_file(state, str(out / "model.safetensors"))
    scores = build_reward("imagereward", {"path": str(out)})(_images(32, 32), PROMPTS)
    torch.testing.assert_close(scores, torch.full((4,), (2.5 - IR_MEAN) / IR_STD), rtol=0, atol=1e-6)


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize("name", ["aesthetic", "pickscore", "hpsv2", "imagereward"])
def test_missing_weights_name_the_path_and_how_to_get_them(name, tmp_path):
    with pytest.raises(RewardError, match="reward.options.path"):
        build_reward(name, {})
    missing = tmp_path / "nope"
    with pytest.raises(RewardError) as err:
        build_reward(name, {"path": str(missing)})
    assert str(missing) in str(err.value) and ("convert" in str(err.value) or "download" in str(err.value))
    with pytest.raises(RewardError, match="nobody/no-such-model"):  # a hub id, offline
        build_reward(name, {"path": "nobody/no-such-model"})


def test_checkpoint_lacking_weights_is_an_error(tmp_path, aesthetic_dir):
    """transformers would fill a missing projection with random values and only warn."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    cfg = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        image_size=28,
        patch_size=14,
        projection_dim=16,
    )
    CLIPVisionModel(cfg).save_pretrained(str(tmp_path / "clip"))  # no visual_projection
    head = str(aesthetic_dir / "aesthetic_head.safetensors")
    with pytest.raises(
        RewardError, match=r"lacks 1 weights of CLIPVisionModelWithProjection.*visual_projection"
    ):
        build_reward("aesthetic", {"path": head, "clip_path": str(tmp_path / "clip")})


def test_bad_batch_size_is_rejected(clip_dir):
    with pytest.raises(RewardError, match="batch_size must be a positive integer, got 0"):
        build_reward("pickscore", {"path": str(clip_dir), "batch_size": 0})


def test_unknown_option_lists_accepted_ones(clip_dir):
    with pytest.raises(
        RewardError, match=r"bad options.*accepted: \['path', 'tokenizer_path', 'batch_size'\]"
    ):
        build_reward("pickscore", {"path": str(clip_dir), "bacth_size": 2})


def test_missing_tokenizer_says_which_option(tmp_path, clip_tokenizer):
    _tiny_clip(clip_tokenizer, seed=7).save_pretrained(str(tmp_path))
    with pytest.raises(RewardError, match="tokenizer_path"):
        build_reward("hpsv2", {"path": str(tmp_path)})


def test_convert_refuses_pickled_code_and_wrong_checkpoints(tmp_path, capsys):
    torch.save(
        {"state_dict": {"w": torch.zeros(1)}, "extra": RewardError("not a tensor")}, tmp_path / "bad.pt"
    )
    with pytest.raises(RewardError, match="refusing to unpickle"):
        conv.load_source(tmp_path / "bad.pt")
    assert conv.main(["hpsv2", str(tmp_path / "missing.pt"), str(tmp_path / "out")]) == 1
    assert "checkpoint not found" in capsys.readouterr().err
    torch.save({"layers.0.weight": torch.zeros(2, 2)}, tmp_path / "head.pt")  # an aesthetic head, not HPSv2
    assert conv.main(["hpsv2", str(tmp_path / "head.pt"), str(tmp_path / "out")]) == 1
    assert "lacks tensor 'visual.proj'" in capsys.readouterr().err
    assert conv.main(["imagereward", str(tmp_path / "head.pt"), str(tmp_path / "out")]) == 1
    assert "no place in the target model: ['layers.0.weight']" in capsys.readouterr().err
