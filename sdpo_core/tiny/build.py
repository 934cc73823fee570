"""Build the embedded base model a config asks for (``model.build``), once.

Pipelines that point ``model.pretrained`` at a hub id or an existing directory need nothing.
Embedded builders (``model.build``) write a real diffusers pipeline directory at
``model.pretrained`` once; later calls reuse it. The ``base`` stage (``sdpo_core/stages.py``)
calls :func:`ensure_base`.
"""

from __future__ import annotations

import logging
import shutil
import socket
from pathlib import Path

from sdpo_core.config import Config, ConfigError
from sdpo_core.rundir import ranks
from sdpo_core.tiny.random_model import RANDOM_TINY_WORDS, TinySizes, build_tiny_pipeline
from sdpo_core.tiny.repro import fixed_threads
from sdpo_core.tiny.train_base import build_digits_base, digits_pipeline
from sdpo_core.tiny.train_flow import build_digits_flow_tiny, digits_flow_pipeline

log = logging.getLogger(__name__)


def base_exists(path: str | Path) -> bool:
    return (Path(path) / "model_index.json").is_file()


def untrained_base(build: str, out_dir: str | Path, seed: int = 0) -> Path:
    """The architecture of ``model.build``, randomly initialised and saved to ``out_dir`` (its
    configs and parameter counts are those of the trained base; ``sdpo plan`` reads them)."""
    builders = {"random-tiny": lambda: build_tiny_pipeline(TinySizes(words=RANDOM_TINY_WORDS), seed=seed),
                "digits-tiny": lambda: digits_pipeline(seed), "digits-flow-tiny": lambda: digits_flow_pipeline(seed)}
    builders[build]().save_pretrained(out_dir, safe_serialization=True)
    return Path(out_dir)


def build_random_tiny(out_dir: str | Path, seed: int = 0) -> Path:
    """A randomly initialised tiny pipeline (fast tests and smoke runs), written atomically."""
    out = Path(out_dir)
    pipe = build_tiny_pipeline(TinySizes(words=RANDOM_TINY_WORDS), seed=seed)
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
        with fixed_threads():  # the same bits whatever the machine's core count (tiny/repro.py)
            build_digits_flow_tiny(target, seed=cfg.model.build_seed, steps=cfg.model.build_steps,
                                   vae_steps=cfg.model.build_vae_steps, force=force)
    else:
        build_digits_base(
            target, steps=cfg.model.build_steps, vae_steps=cfg.model.build_vae_steps, seed=cfg.model.build_seed
        )
    return target


def ensure_base_once(cfg: Config, force: bool = False) -> str:
    """:func:`ensure_base` by rank 0 alone under a launcher (one writer); the other ranks wait for it
    and then check that they see the model it built (on several machines: a shared filesystem)."""
    target = ranks.main_only(ensure_base, cfg, force)
    if cfg.model.build is not None and not base_exists(target):  # only a rank on another machine can miss it
        raise ConfigError(
            f"model.pretrained: rank 0 built the base model in {target}, but rank {ranks.rank()} on "
            f"{socket.gethostname()} does not see it; point model.pretrained at a filesystem every node mounts, "
            f"or build it on every node first (sdpo base --pipeline {cfg.pipeline})"
        )
    return target
