"""The code's shape, read with ``ast``: one-way imports (no circles, sdpo_core never imports flows),
flows/ uses only sdpo_core's public names, every dvc.yaml stage depends on the code its command
runs, and dvc.yaml defines exactly the stages ``sdpo_core.stages.STAGES`` declares.

The rule for imports inside functions: they count like any other import, so one can never hide a
circle (``test_project_imports_have_no_circle``, and ``test_no_function_level_import_closes_a_circle``
which names the import). What remains legitimate is a function-level import that keeps a heavy
library (torch, diffusers, mlflow) out of a light command: hoisting it would change when a
library loads, not the shape of the graph. Importing ``a.b.c`` from outside package ``a`` also
runs ``a/__init__.py`` (and ``a/b/__init__.py``), so that counts as an import of those packages;
a submodule's import of its own parent package does not (a package's ``__init__`` may import its
own submodules).
"""

from __future__ import annotations

import ast
import inspect
import shlex
from functools import cache
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("sdpo_core", "flows")
# imported by the stage commands but unable to change a stage's outputs
NOT_RESULTS = {
    "sdpo_core.cli": "argument parsing; the stages' inputs are the config (params) and paths",
    "sdpo_core.tracking.trackers": "MLflow / null tracking only: nothing a stage writes depends on it",
    "sdpo_core.tracking.runs": "opens and ends a stage's tracking run: nothing a stage writes depends on it",
    "sdpo_core.rundir.lock": "the run directory's lock: who may write, not what is written",
    "sdpo_core.rundir.atomic": "write-then-rename: how files land, not their content",
    "sdpo_core.rundir.ranks": "which process of a launch writes and the collectives that move data between them: "
    "who computes, not what (a launched evaluation is one process's, bit for bit: tests/e2e/test_launchers.py)",
}


@cache
def modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


@cache
def tree(module: str) -> ast.Module:
    return ast.parse(modules()[module].read_text(encoding="utf-8"))


def resolve(name: str) -> str | None:
    """The project module that ``name`` (a module or ``module.attr``) lives in, or None."""
    while name:
        if name in modules():
            return name
        name = name.rpartition(".")[0]
    return None


def parent_packages(module: str, target: str) -> set[str]:
    """The packages whose ``__init__`` importing ``target`` runs, besides those ``module`` is in."""
    parts = target.split(".")
    ancestors = {".".join(parts[:i]) for i in range(1, len(parts))}
    own = {module} | {module.rsplit(".", i)[0] for i in range(1, module.count(".") + 1)}
    return {p for p in ancestors - own if p in modules()}


def imported(module: str, nodes) -> set[tuple[str, str | None]]:
    """(project module, imported name or None) of every import statement among ``nodes``."""
    is_pkg = modules()[module].name == "__init__.py"
    out = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            out |= {(m, None) for a in node.names if (m := resolve(a.name))}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                here = module.split(".") if is_pkg else module.split(".")[:-1]
                base = ".".join(here[: len(here) - node.level + 1] + ([node.module] if node.module else []))
            for a in node.names:
                target = resolve(f"{base}.{a.name}")
                if target == f"{base}.{a.name}":  # `from pkg import submodule`
                    out.add((target, None))
                elif target:
                    out.add((target, a.name))
    return out


def with_parents(module: str, targets: set[str]) -> set[str]:
    return (targets | {p for t in targets for p in parent_packages(module, t)}) - {module}


@cache
def code_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports anywhere (top or inside a function)."""
    return {m: {t for t, _ in imported(m, ast.walk(tree(m)))} - {m} for m in modules()}


@cache
def graph() -> dict[str, set[str]]:
    """:func:`code_graph` with the packages whose ``__init__`` those imports run."""
    return {m: with_parents(m, targets) for m, targets in code_graph().items()}


def top_imports(module: str) -> list[ast.AST]:
    return [n for n in tree(module).body if isinstance(n, ast.Import | ast.ImportFrom)]


@cache
def top_graph() -> dict[str, set[str]]:
    """module -> the project modules its module-level imports load (what ``import module`` runs)."""
    return {m: with_parents(m, {t for t, _ in imported(m, top_imports(m))}) for m in modules()}


def reaches(g: dict[str, set[str]], start: str, goal: str) -> bool:
    seen, todo = set(), [start]
    while todo:
        v = todo.pop()
        if v == goal:
            return True
        if v not in seen:
            seen.add(v)
            todo.extend(g[v])
    return False


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def visit(v: str) -> list[str] | None:
        state[v] = 1
        path.append(v)
        for w in sorted(g[v]):
            if state.get(w) == 1:
                return path[path.index(w):] + [w]
            if w not in state and (found := visit(w)):
                return found
        state[v] = 2
        path.pop()
        return None

    for v in sorted(g):
        if v not in state and (found := visit(v)):
            return found
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_project_imports_have_no_circle():
    """Fails on e.g. sdpo_core.cli <-> flows.commands, or a reward module that imports the
    sdpo_core.rewards package which imports it to register it."""
    assert "sdpo_core.rewards.digits" in graph() and "flows.commands" in graph()
    cycle = find_cycle(graph())
    assert cycle is None, f"import circle: {' -> '.join(cycle)}"


def test_an_import_of_a_submodule_counts_its_package():
    """``from sdpo_core.tracking.trackers import ...`` runs sdpo_core/tracking/__init__.py too: how
    the old rewards/__init__ <-> tiny/digits circle (through rewards.registry) stayed hidden."""
    assert "sdpo_core.tracking" in graph()["sdpo_core.stages"]
    assert parent_packages("sdpo_core.rewards.builtin", "sdpo_core.rewards.remote") == set()
    assert parent_packages("sdpo_core.evaluation.metrics", "sdpo_core.rewards.digits") == {"sdpo_core.rewards"}


def test_no_function_level_import_closes_a_circle():
    """Every import written inside a function of sdpo_core could move to the top of its module
    without making a circle: the imported module does not (at module level) import it back."""
    found = []
    for m in (m for m in modules() if m.startswith("sdpo_core")):
        top = {t for t, _ in imported(m, top_imports(m))}
        for fn in (n for n in ast.walk(tree(m)) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)):
            inner = [n for n in ast.walk(fn) if isinstance(n, ast.Import | ast.ImportFrom)]
            for target in with_parents(m, {t for t, _ in imported(m, inner)}) - top:
                if reaches(top_graph(), target, m):
                    found.append(f"{m}.{fn.name} imports {target}, which imports {m} back")
    assert found == []


def test_sdpo_core_never_imports_flows():
    offenders = {m: sorted(d) for m, d in graph().items() if m.startswith("sdpo_core") and
                 any(t.startswith("flows") for t in d)}
    assert offenders == {}


def test_families_and_samplers_do_not_import_each_other():
    """A family reports model facts (e.g. its image token count) and the sampler does the math:
    fails on e.g. sdpo_core.families.flux importing calculate_shift from samplers.flow_sde."""
    crossing = {m: sorted(t for t in d if t.startswith(("sdpo_core.samplers", "sdpo_core.families")) and
                          t.split(".")[1] != m.split(".")[1])
                for m, d in graph().items() if m.startswith(("sdpo_core.samplers", "sdpo_core.families"))}
    assert {m: d for m, d in crossing.items() if d} == {}


def test_only_samplers_import_diffusers_private_names():
    """Scheduler math is mirrored in samplers/ alone: `from diffusers.x import _y` elsewhere in
    sdpo_core ties it to diffusers internals a version bump may change silently."""
    found = []
    for m in (m for m in modules() if m.startswith("sdpo_core") and not m.startswith("sdpo_core.samplers")):
        for node in ast.walk(tree(m)):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("diffusers"):
                found += [f"{m}: from {node.module} import {a.name}" for a in node.names if a.name.startswith("_")]
    assert found == []


def test_flows_uses_no_private_sdpo_core_names():
    """`from sdpo_core.x import _y` and `sdpo_core_module._y` in flows/ tie it to internals."""
    found = []
    for m in (m for m in modules() if m.startswith("flows")):
        aliases = set()  # local names bound to sdpo_core modules
        for node in ast.walk(tree(m)):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("sdpo_core"):
                for a in node.names:
                    if a.name.startswith("_"):
                        found.append(f"{m}: from {node.module} import {a.name}")
                    elif resolve(f"{node.module}.{a.name}") == f"{node.module}.{a.name}":
                        aliases.add(a.asname or a.name)
            elif isinstance(node, ast.Import):
                aliases |= {a.asname or a.name for a in node.names if a.name.startswith("sdpo_core")}
        for node in ast.walk(tree(m)):
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                    and isinstance(node.value, ast.Name) and node.value.id in aliases):
                found.append(f"{m}: {node.value.id}.{node.attr}")
    assert found == []


# ------------------------------------------------------------------------------------- dvc.yaml
def _defs(module: str) -> dict[str, ast.AST]:
    return {n.name: n for n in tree(module).body if isinstance(n, ast.FunctionDef | ast.ClassDef)}


def bound_names(node: ast.Import | ast.ImportFrom) -> set[str]:
    return {a.asname or a.name.split(".")[0] for a in node.names}


def code_of(module: str, name: str | None, seen: set | None = None) -> set[str]:
    """Project modules that ``module.name`` runs: a function's own imports and those of the same
    module's functions it calls, plus the top-level imports of its module whose names it uses; a
    class, a module or anything reached from there counts with every import of its module,
    transitively."""
    seen = set() if seen is None else seen
    if (module, name) in seen:
        return set()
    seen.add((module, name))
    node = _defs(module).get(name) if name else None
    if not isinstance(node, ast.FunctionDef):
        out = {module}
        for target in code_graph()[module]:
            out |= code_of(target, None, seen)
        return out
    used = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
    top = [n for n in top_imports(module) if bound_names(n) & used]
    out = {module}
    for target, attr in imported(module, [*top, *ast.walk(node)]):
        out |= code_of(target, attr, seen)
    for call in ast.walk(node):
        if isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id in _defs(module):
            out |= code_of(module, call.func.id, seen)
    return out


def covered(module: str, deps: list[str]) -> bool:
    path = modules()[module].relative_to(ROOT)
    return any(path == Path(d) or Path(d) in path.parents for d in deps)


def test_code_that_changes_results_is_a_dvc_dep():
    """Every sdpo_core module a stage's `sdpo` command runs is a dep of that stage (a file or a
    folder above it): fails when e.g. sdpo_core/config.py or sdpo_core/tiny/ is missing from train's
    deps, so that `dvc repro` would reuse outputs of older code."""
    from sdpo_core.cli import build_parser, cmd_stage

    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    missing = {}
    for stage, spec in stages.items():
        cmds = spec["do"]["cmd"]
        deps = spec["do"]["deps"]
        for cmd in [cmds] if isinstance(cmds, str) else cmds:
            argv = [a.replace("${item}", "tiny-random").replace("${key}", "tiny-random") for a in shlex.split(cmd)]
            assert argv[0] == "sdpo", cmd
            args = build_parser().parse_args(argv[1:])
            func = args.stage.command if args.func is cmd_stage else args.func  # a declared stage's own
            assert func.__module__ in ("sdpo_core.cli", "sdpo_core.stages") and inspect.isfunction(func)
            ran = code_of(func.__module__, func.__name__) - set(NOT_RESULTS)
            assert ran, cmd
            gaps = sorted(m for m in ran if not covered(m, deps))
            if gaps:
                missing[f"{stage}: {cmd}"] = gaps
    assert missing == {}


def test_dvc_yaml_defines_the_declared_stages():
    """dvc.yaml's stages are ``stages.versioned_stages()`` in order, each running ``sdpo <name>``;
    each stage's outs, metrics and plots are the declared outputs, its ``runs/`` deps the declared
    inputs (relative to the run dir) and its params the declared config sections: a stage added to
    or changed in sdpo_core/stages.py fails here until dvc.yaml follows."""
    from sdpo_core.stages import STAGES, versioned_stages

    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert list(dvc) == versioned_stages()
    declared = {s.name: s for s in STAGES}
    for name, spec in dvc.items():
        do = spec["do"]
        # a foreach over the pipelines dict names the pipeline ${key} (its item holds the base), over a list ${item}
        run = "runs/${key}/" if spec["foreach"] == "${pipelines}" else "runs/${item}/"
        cmds = [do["cmd"]] if isinstance(do["cmd"], str) else do["cmd"]
        assert shlex.split(cmds[0])[:2] == ["sdpo", name]
        paths = [p if isinstance(p, str) else next(iter(p)) for key in ("outs", "metrics", "plots")
                 for p in do.get(key, [])]
        assert all(p.startswith(run) for p in paths), paths
        assert sorted(p.removeprefix(run) for p in paths) == sorted(declared[name].outputs), name
        run_deps = ["base" if d == "${item.base}" else d.removeprefix(run) for d in do["deps"]
                    if d.startswith("runs/") or d == "${item.base}"]
        assert sorted(run_deps) == sorted(declared[name].inputs), name
        keys = [k for entry in do["params"] if "pipelines.yaml" in entry for k in entry["pipelines.yaml"]]
        sections = {k.removeprefix("defaults").removeprefix(f"pipelines.{run[5:-1]}").lstrip(".").split(".")[0] or "*"
                    for k in keys}
        assert sections == set(declared[name].params), name
    # the resolved config of a run (train's config.yaml, --set overrides included) is a params file
    assert any({"runs/${key}/config.yaml": None} in spec["do"]["params"] for spec in dvc.values())


def test_dvc_yaml_covers_every_pipeline():
    """dvc.yaml's `pipelines` are pipelines.yaml's, each with the base its train and evaluate load:
    the base stage's output for a built one (model.build), the hub loader for a hub model; `built`
    are the pipelines that build their base into runs/<name>/base, which is what the base stage
    applies to (bug caught: a pipeline added to pipelines.yaml that a flow run does not version)."""
    from sdpo_core.config import load_config, pipeline_names
    from sdpo_core.rundir.paths import default_run_dir
    from sdpo_core.stages import stage

    dvc_vars = {k: v for entry in yaml.safe_load((ROOT / "dvc.yaml").read_text())["vars"] for k, v in entry.items()}
    names = pipeline_names(ROOT / "pipelines.yaml")
    cfgs = {n: load_config(n, [], ROOT / "pipelines.yaml") for n in names}
    assert list(dvc_vars["pipelines"]) == names
    want = {n: c.model.pretrained if stage("base").applies(c) else "sdpo_core/families/hub.py" for n, c in cfgs.items()}
    assert {n: v["base"] for n, v in dvc_vars["pipelines"].items()} == want
    assert dvc_vars["built"] == [n for n, c in cfgs.items()
                                 if stage("base").applies(c) and Path(c.model.pretrained) == default_run_dir(n) / "base"]
    # every built base has the base stage that writes it
    assert {want[n] for n, c in cfgs.items() if stage("base").applies(c)} <= {f"runs/{n}/base" for n in dvc_vars["built"]}


# the layers of sdpo_core, top to bottom, as docs/architecture.md draws them: a module imports only
# from its own package or module and from layers below its own
LAYERS = (
    ("cli",),
    ("config_docs",),
    ("stages",),
    ("plan",),
    ("tiny", "training"),
    ("evaluation", "tracking"),
    ("generate", "prompts"),
    ("config",),
    ("sampling", "methods"),
    ("samplers", "families", "rewards", "rl", "rundir", "sources"),
)


def _layer_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "sdpo_core" and len(parts) > 1 else None


def test_every_package_has_a_layer():
    placed = {p for layer in LAYERS for p in layer}
    tops = {_layer_of(m) for m in graph() if m.startswith("sdpo_core.")}
    assert tops - {None} == placed, "place new sdpo_core modules in LAYERS and docs/architecture.md"


def test_packages_import_only_lower_layers():
    """Fails on e.g. families importing training, or config importing stages."""
    rank = {p: i for i, layer in enumerate(LAYERS) for p in layer}
    upward = [
        f"{a} -> {b}"
        for a, targets in graph().items()
        for b in targets
        if (la := _layer_of(a)) and (lb := _layer_of(b)) and la != lb and rank[lb] <= rank[la]
    ]
    assert not upward, "imports that do not go down a layer: " + ", ".join(sorted(upward))
