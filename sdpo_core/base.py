"""The `base` stage: make sure the pipeline's base model exists, building an embedded one if asked.

Pipelines that point ``model.pretrained`` at a hub id or an existing directory need nothing.
Embedded builders (``model.build``) write a real diffusers pipeline directory at
``model.pretrained`` once; later calls reuse it.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from sdpo_core.config import Config

log = logging.getLogger(__name__)


# words the random tiny tokenizer knows whole (others fall back to characters)
RANDOM_TINY_WORDS = (
    "a an the of handwritten digit number drawing zero one two three four five six seven eight nine "
    "cat dog horse bird fish"
).split()


def base_exists(path: str | Path) -> bool:
    return (Path(path) / "model_index.json").is_file()


def build_random_tiny(out_dir: str | Path, seed: int = 0) -> Path:
    """A randomly initialised tiny pipeline (fast tests and smoke runs), written atomically."""
    from sdpo_core.tiny.pipeline import TinySizes, build_tiny_pipeline

    out = Path(out_dir)
    words = RANDOM_TINY_WORDS
    pipe = build_tiny_pipeline(TinySizes(words=words), seed=seed)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp, safe_serialization=True)
    tmp.replace(out)
    return out


def ensure_base(cfg: Config, force: bool = False) -> str:
    """Return the model to train from, building the embedded base model when configured."""
    target = cfg.model.pretrained
    if cfg.model.build is None:
        return target
    if base_exists(target) and not force:
        log.info("base model: reusing %s", target)
        return target
    Path(target).parent.mkdir(parents=True, exist_ok=True)
    if force and Path(target).exists():
        shutil.rmtree(target)
    log.info("base model: building '%s' into %s", cfg.model.build, target)
    if cfg.model.build == "random-tiny":
        build_random_tiny(target, seed=cfg.model.build_seed)
    elif cfg.model.build == "digits-flow-tiny":
        from sdpo_core.tiny.repro import fixed_threads
        from sdpo_core.tiny.train_flow import build_digits_flow_tiny

        with fixed_threads():  # the same bits whatever the machine's core count (tiny/repro.py)
            build_digits_flow_tiny(target, seed=cfg.model.build_seed, steps=cfg.model.build_steps,
                                   vae_steps=cfg.model.build_vae_steps, force=force)
    else:
        from sdpo_core.tiny.train_base import build_digits_base

        build_digits_base(
            target, steps=cfg.model.build_steps, vae_steps=cfg.model.build_vae_steps, seed=cfg.model.build_seed
        )
    return target
