"""The code's shape, read with ``ast``: one-way imports (no circles, sdpo_core never imports flows),
flows/ uses only sdpo_core's public names, and every dvc.yaml stage depends on the code its
command runs.

Imports count wherever they are written (module top or inside a function): a lazy import still
makes the two modules depend on each other. A submodule's implicit import of its parent package
is not counted (a package's ``__init__`` may import its own submodules).
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
    "sdpo_core.rundir.lock": "the run directory's lock: who may write, not what is written",
    "sdpo_core.rundir.atomic": "write-then-rename: how files land, not their content",
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


@cache
def graph() -> dict[str, set[str]]:
    return {
        m: {t for t, _ in imported(m, ast.walk(tree(m)))} - {m} for m in modules()
    }


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
    """Fails on e.g. sdpo_core.cli <-> flows.commands, or sdpo_core.rewards <-> sdpo_core.tiny.digits."""
    assert "sdpo_core.tiny.digits" in graph() and "flows.commands" in graph()
    cycle = find_cycle(graph())
    assert cycle is None, f"import circle: {' -> '.join(cycle)}"


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


def code_of(module: str, name: str | None, seen: set | None = None) -> set[str]:
    """Project modules that ``module.name`` runs: a function's own imports and those of the same
    module's functions it calls, plus its module's top-level imports; a class, a module or anything
    reached from there counts with every import of its module, transitively."""
    seen = set() if seen is None else seen
    if (module, name) in seen:
        return set()
    seen.add((module, name))
    node = _defs(module).get(name) if name else None
    if not isinstance(node, ast.FunctionDef):
        out = {module}
        for target in graph()[module]:
            out |= code_of(target, None, seen)
        return out
    top = [n for n in tree(module).body if isinstance(n, ast.Import | ast.ImportFrom)]
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
    from sdpo_core.cli import build_parser

    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    missing = {}
    for stage, spec in stages.items():
        cmds = spec["do"]["cmd"]
        deps = spec["do"]["deps"]
        for cmd in [cmds] if isinstance(cmds, str) else cmds:
            argv = [a.replace("${item}", "tiny-random") for a in shlex.split(cmd)]
            assert argv[0] == "sdpo", cmd
            func = build_parser().parse_args(argv[1:]).func
            assert func.__module__ == "sdpo_core.cli" and inspect.isfunction(func)
            ran = code_of("sdpo_core.cli", func.__name__) - set(NOT_RESULTS)
            assert ran, cmd
            gaps = sorted(m for m in ran if not covered(m, deps))
            if gaps:
                missing[f"{stage}: {cmd}"] = gaps
    assert missing == {}
