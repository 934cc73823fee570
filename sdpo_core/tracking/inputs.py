"""What a trained model was made from, hashed: the inputs a scheduled retraining compares before it
trains again (docs/orchestration.md, "Retraining").

The inputs are the prompts (the split's files and, for a remote source, the version the manifest
records), the resolved config, the base model (``model.pretrained`` at ``model.revision``) and the
reward (name and options). Each is a tag ``sdpo.inputs.<name>`` on the registered version; their
combination is ``sdpo.inputs_hash``. A new run whose hash equals a registered version's has nothing
new to learn from: the flow skips it (unless forced).

Usage::

    tags = input_tags(cfg, load_split("runs/digits-tiny/prompts").manifest)
"""

from __future__ import annotations

import hashlib
import json

from sdpo_core.config import Config, dump_yaml

INPUTS_TAG = "sdpo.inputs_hash"
PREFIX = "sdpo.inputs."


def _sha(value) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def input_tags(cfg: Config, manifest: dict) -> dict[str, str]:
    """``sdpo.inputs.<prompts|config|base|reward>`` and ``sdpo.inputs_hash`` of a run with ``cfg``
    whose prompt split has ``manifest`` (``prompts.load_split(...).manifest``)."""
    parts = {
        "prompts": {"files": manifest.get("sha256"), "source_version": manifest.get("source_version")},
        "config": dump_yaml(cfg),
        "base": {"pretrained": cfg.model.pretrained, "revision": cfg.model.revision, "build": cfg.model.build},
        "reward": cfg.reward.model_dump(mode="json"),
    }
    tags = {f"{PREFIX}{name}": _sha(value) for name, value in parts.items()}
    tags[INPUTS_TAG] = _sha(tags)
    return tags
