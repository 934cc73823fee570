"""docs/config.md, generated from the config models of ``sdpo_core/config.py``: every key with its
type (and range), default and description, and from the stage declarations of
``sdpo_core/stages.py`` which sections each stage reads and what it writes, so the reference cannot
drift from the code.

    sdpo config docs                          # print it
    sdpo config docs --write docs/config.md   # regenerate the file (tests/unit/test_config.py
                                              # fails while the committed file is stale)
"""

from __future__ import annotations

import json
import types
import typing
from pathlib import Path
from typing import Any, Literal

import annotated_types as at
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from sdpo_core.config import Config
from sdpo_core.methods import METHODS
from sdpo_core.stages import STAGES

DOC_PATH = Path(__file__).resolve().parents[1] / "docs" / "config.md"

HEADER = """\
# Configuration keys

<!-- Generated from sdpo_core/config.py by `sdpo config docs --write docs/config.md`; do not edit by
hand: change the Field(description=...) in config.py and regenerate (a test fails while it is stale). -->

`pipelines.yaml` holds `defaults` and named `pipelines`; a pipeline's config is defaults <- pipeline <-
`--set key=value`. Unknown keys are errors (with the closest valid name); `sdpo config show NAME`
prints the resolved config. The defaults below are the models' own; `pipelines.yaml`'s `defaults`
section may set others for every pipeline. Number keys take no `true`/`false` and floats no
`inf`/`nan`. `sample.num_steps` and `evaluate.steps` are checked against the scheduler of a local
`model.pretrained` when the config loads (`num_train_timesteps`, and LCM's `original_inference_steps`);
a hub id, or a base `sdpo base` has not built yet, is checked when its sampler is built.
"""

FOOTER = """\
Batch sizes are per process. Each method samples k trajectories per prompt and trains on items of
one trajectory or of all k (`train.batch_size` items per backward), as the table says. `sdpo config
show` prints the derived batch plan; bad combinations are rejected with what to change.
"""


def methods_table() -> str:
    """One row per registered method (``methods.METHODS``): what it samples and trains on."""
    rows = ["| `train.method` | trajectories per prompt | x_T | training item | `update_schedule: auto` |",
            "|---|---|---|---|---|"]
    for name, m in METHODS.items():
        k, per_item = m.trajectories_per_prompt, m.trajectories_per_item
        item = "one trajectory" if per_item == 1 else f"the {k} together ({m.item_noun})"
        noise = "shared" if m.shared_noise else "independent"
        rows.append(f"| `{name}` | {k} | {noise} | {item} | `{m.update_schedule}` |")
    return "\n".join(rows) + "\n"

_BOUNDS = ((at.Ge, ">=", "ge"), (at.Gt, ">", "gt"), (at.Le, "<=", "le"), (at.Lt, "<", "lt"))


def type_text(annotation: Any) -> str:
    """A reader's name for a field type: ``int``, ``str or null``, ``one of `a`, `b```, ``list[int]``."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:  # config.Int / config.Float: the number, its checks aside
        return type_text(args[0])
    if origin is Literal:
        return "one of " + ", ".join(f"`{a}`" for a in args)
    if origin in (typing.Union, types.UnionType):
        parts = [type_text(a) for a in args if a is not type(None)]
        return " or ".join(parts) + (" or null" if type(None) in args else "")
    if origin in (list, dict):
        return f"{origin.__name__}[{', '.join(type_text(a) for a in args)}]"
    if annotation is Any:
        return "any"
    return getattr(annotation, "__name__", str(annotation))


def range_text(field: FieldInfo) -> str:
    """The numeric bounds of a field, e.g. ``>= 0, < 1`` (empty when it has none)."""
    bounds = []
    for meta in field.metadata:
        for kind, symbol, attr in _BOUNDS:
            if isinstance(meta, kind):
                bounds.append(f"{symbol} {getattr(meta, attr)}")
    return ", ".join(bounds)


def default_text(field: FieldInfo) -> str:
    if field.is_required():
        return "required"
    value = field.default_factory() if field.default_factory is not None else field.default  # type: ignore[call-arg]
    if value is PydanticUndefined:
        return "required"
    return f"`{value}`" if isinstance(value, str) else f"`{json.dumps(value)}`"


def _section(model: type[BaseModel]) -> type[BaseModel] | None:
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def rows(model: type[BaseModel], prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(key, type, default, description) of every leaf key of ``model``, nested sections flattened
    into dotted keys, in declaration order."""
    out = []
    for name, field in model.model_fields.items():
        sub = _section(field.annotation)  # type: ignore[arg-type]
        if sub is not None:
            out.extend(rows(sub, f"{prefix}{name}."))
            continue
        # a key whose values a registry lists (train.method: methods.METHODS) shows them
        kind = type_text(Literal[tuple(METHODS)]) if f"{prefix}{name}" == "train.method" else type_text(field.annotation)
        bounds = range_text(field)
        out.append(
            (
                f"`{prefix}{name}`",
                f"{kind}, {bounds}" if bounds else kind,
                default_text(field),
                (field.description or "").replace("|", "\\|"),
            )
        )
    return out


def config_markdown() -> str:
    """The whole of docs/config.md: one table per section of :class:`Config`."""
    groups = [("top level", "", [r for r in rows(Config) if "." not in r[0]])]
    for name, field in Config.model_fields.items():
        sub = _section(field.annotation)  # type: ignore[arg-type]
        if sub is not None:
            groups.append((f"`{name}`", " ".join((sub.__doc__ or "").split()), rows(sub, f"{name}.")))
    parts = [HEADER]
    for title, lead, table in groups:
        parts += [f"## {title}\n", *([lead + "\n"] if lead else []), "| key | type | default | meaning |"]
        parts += ["|---|---|---|---|", *(f"| {k} | {t} | {d} | {m} |" for k, t, d, m in table), ""]
    parts += [FOOTER, methods_table()]
    return "\n".join(parts) + "\n" + stages_markdown()


def stages_markdown() -> str:
    """The stages section: one row per declared stage, in run order (``stages.STAGES``)."""
    lines = [
        "## Stages\n",
        "What each stage (`sdpo <stage>`, a task of the Prefect flow) reads (config sections, files) and",
        "writes, from its declaration in `sdpo_core/stages.py`. `RUN_DIR` is `runs/<pipeline>` by default;",
        "`RUN_DIR/base` stands for `model.pretrained`. DVC versions the stages marked so (dvc.yaml, checked",
        "against the declarations by tests/unit/test_structure.py).\n",
        "| stage | does | reads | writes | in `sdpo run` | DVC |",
        "|---|---|---|---|---|---|",
    ]
    for s in STAGES:
        reads = ", ".join([*(f"`{k}`" if k != "*" else "the whole config" for k in s.params),
                           *(f"`RUN_DIR/{i}`" for i in s.inputs)])
        writes = ", ".join(f"`RUN_DIR/{o}`" for o in s.outputs) or "the MLflow registry"
        lines.append(f"| `{s.name}` | {s.description} | {reads} | {writes} | {'yes' if s.in_run else 'no'} "
                     f"| {'yes' if s.versioned else 'no'} |")
    return "\n".join(lines) + "\n"


def undocumented_keys() -> list[str]:
    """Keys of :class:`Config` without a description (the docs' test keeps this empty)."""
    return [key.strip("`") for key, _, _, meaning in rows(Config) if not meaning]
