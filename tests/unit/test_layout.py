"""The code's layout stays easy to follow: no import cycles between the project's modules, the pure modules
import no Ray, vLLM or DeepSpeed, and no source file grows past MAX_LINES.

The import graph is read from the source with `ast`, not by importing it. An import counts as
- module level: anything run when the module is imported (also at the bottom of a file, or inside a
  `try`, an `if` or a class body), except under `if TYPE_CHECKING:`;
- deferred: inside a function, or under `if TYPE_CHECKING:`.
Module-level cycles make what a module holds depend on which one was imported first; deferred ones do not
break imports but still tie two modules into one, so neither kind is allowed.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("rvpo_async", "actors", "learner")
FRAMEWORKS = ("ray", "vllm", "deepspeed")
MAX_LINES = 400

# modules that must import without Ray, vLLM or DeepSpeed: the math, the rules, the bookkeeping, the config,
# the judges that run on a plain CPU, and the weight format (which also loads inside a vLLM worker)
PURE = (
    "rvpo_async.algo", "rvpo_async.algo_weights", "rvpo_async.autoscale", "rvpo_async.buffer",
    "rvpo_async.buffer_store", "rvpo_async.buffer_torch", "rvpo_async.config", "rvpo_async.config_judges",
    "rvpo_async.config_load", "rvpo_async.gpu_share", "rvpo_async.rubric", "rvpo_async.rubric_view",
    "rvpo_async.run_state", "rvpo_async.schedule", "rvpo_async.staleness", "rvpo_async.step_math",
    "rvpo_async.study_stats", "rvpo_async.task", "rvpo_async.types", "rvpo_async.weight_format",
    "rvpo_async.interfaces", "rvpo_async.fileio",
    "actors.judges.base", "actors.judges.factory", "actors.judges.rules", "actors.judges.rule_builders", "actors.rollout.weight_receiver",
    "learner.checkpoint", "rvpo_async.loss", "rvpo_async.reference",
)


@dataclass(frozen=True)
class Import:
    target: str  # a project module, or the top-level name of a third-party one
    line: int
    deferred: bool  # inside a function or under `if TYPE_CHECKING:`


def project_modules(root: Path = ROOT) -> dict[str, Path]:
    """Dotted name -> file, for every module of the project's packages (a package is its __init__)."""
    out = {}
    for pkg in PACKAGES:
        for f in sorted((root / pkg).rglob("*.py")):
            parts = f.relative_to(root).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports_of(module: str, source: str, modules: set[str], is_package: bool = False) -> list[Import]:
    """Every import in `source` (the text of `module`): project modules by their dotted name (with the
    packages above them, which Python imports first), anything else by its top-level name."""
    package = module if is_package else module.rpartition(".")[0]
    found: list[Import] = []

    def project(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    def add(name: str, line: int, deferred: bool) -> None:
        mod = project(name)
        if mod is None:
            found.append(Import(name.split(".")[0], line, deferred))
            return
        parts = mod.split(".")
        for i in range(1, len(parts) + 1):
            if ".".join(parts[:i]) != module:
                found.append(Import(".".join(parts[:i]), line, deferred))

    def visit(nodes: list[ast.stmt], deferred: bool) -> None:
        for node in nodes:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                visit(node.body, True)
                continue
            if isinstance(node, ast.If) and _is_type_checking(node.test):
                visit(node.body, True)
                visit(node.orelse, deferred)
                continue
            if isinstance(node, ast.Import):
                for alias in node.names:
                    add(alias.name, node.lineno, deferred)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the module's package, one level up per extra dot
                    anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                for alias in node.names:  # `from pkg import submodule` imports the submodule
                    add(f"{base}.{alias.name}" if project(f"{base}.{alias.name}") == f"{base}.{alias.name}"
                        else base, node.lineno, deferred)
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.stmt):
                    visit([child], deferred)
                elif isinstance(child, ast.ExceptHandler):
                    visit(child.body, deferred)

    visit(ast.parse(source).body, False)
    return found


def import_graph(modules: dict[str, Path], deferred: bool) -> dict[str, dict[str, int]]:
    """module -> {imported project module: line of the first such import}; `deferred` adds the imports
    inside functions and under TYPE_CHECKING."""
    names = set(modules)
    graph: dict[str, dict[str, int]] = {}
    for mod, path in modules.items():
        edges: dict[str, int] = {}
        for imp in imports_of(mod, path.read_text(), names, path.name == "__init__.py"):
            if imp.target in names and (deferred or not imp.deferred):
                edges.setdefault(imp.target, imp.line)
        graph[mod] = edges
    return graph


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One cycle (a path back to its start) through each strongly connected component of >1 module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(v: str) -> None:  # Tarjan's algorithm; the graph is small enough to recurse
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                components.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return [_cycle_in(graph, set(comp), comp[0]) for comp in components]


def _cycle_in(graph: dict[str, dict[str, int]], comp: set[str], start: str) -> list[str]:
    paths = {start: [start]}
    frontier = [start]
    while frontier:  # breadth first: the shortest way back to `start`
        nxt = []
        for v in frontier:
            for w in sorted(graph[v]):
                if w == start:
                    return paths[v] + [start]
                if w in comp and w not in paths:
                    paths[w] = paths[v] + [w]
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no cycle through {start}")  # pragma: no cover


def describe(graph: dict[str, dict[str, int]], cycle: list[str]) -> str:
    return " -> ".join(f"{a} (line {graph[a][b]})" for a, b in zip(cycle, cycle[1:])) + f" -> {cycle[-1]}"


@pytest.mark.parametrize("deferred", [False, True], ids=["module_level", "including_deferred"])
def test_no_import_cycles(deferred: bool) -> None:
    graph = import_graph(project_modules(), deferred)
    found = [describe(graph, c) for c in cycles(graph)]
    assert not found, "import cycles:\n" + "\n".join(found)


def test_pure_modules_import_no_framework_at_module_level() -> None:
    """Checked on the source, through every project module they import at module level."""
    modules = project_modules()
    names = set(modules)
    direct = {m: [i for i in imports_of(m, p.read_text(), names, p.name == "__init__.py") if not i.deferred]
              for m, p in modules.items()}
    bad = []
    for start in PURE:
        via = {start: [start]}
        todo = [start]
        while todo:
            mod = todo.pop()
            for imp in direct[mod]:
                if imp.target in names and imp.target not in via:
                    via[imp.target] = via[mod] + [imp.target]
                    todo.append(imp.target)
                elif imp.target in FRAMEWORKS:
                    bad.append(f"{start}: {' -> '.join(via[mod])} imports {imp.target} (line {imp.line})")
    assert not bad, "\n".join(bad)


def test_pure_modules_import_no_framework_when_imported() -> None:
    """The same, by importing each in a fresh interpreter (catches a third-party module that pulls one in)."""
    code = (
        "import importlib, json, sys\n"
        f"for name in {list(PURE)!r}:\n"
        "    importlib.import_module(name)\n"
        f"    loaded = sorted({{m.split('.')[0] for m in sys.modules}} & {set(FRAMEWORKS)!r})\n"
        "    if loaded:\n"
        "        print(json.dumps([name, loaded]))\n"
        "        break\n"
        "else:\n"
        "    print(json.dumps(None))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    first = json.loads(proc.stdout.strip().splitlines()[-1])
    assert first is None, f"importing {first[0]} loads {first[1]}"


def test_pure_modules_exist() -> None:
    missing = sorted(set(PURE) - set(project_modules()))
    assert not missing, f"PURE names modules that do not exist: {missing}"


# the RVPO side of the core: what turns rewards into advantages and advantages into a loss
RVPO_MODULES = ("rvpo_async.algo", "rvpo_async.algo_weights", "rvpo_async.loss", "rvpo_async.step_math",
                "rvpo_async.rubric", "rvpo_async.rubric_view", "rvpo_async.schedule")


def test_the_learner_imports_nothing_of_rvpo() -> None:
    """The learner is handed its step builder and its loss (AReaL-lite's split): no module of learner/ imports
    the aggregation, the advantages or the loss, directly or through another project module, at any depth
    (the config is not followed: it describes every part, and the learner reads its own section of it)."""
    modules = project_modules()
    names = set(modules)
    edges = {m: [i for i in imports_of(m, p.read_text(), names, p.name == "__init__.py")] for m, p in modules.items()}
    bad = []
    for start in (m for m in modules if m.split(".")[0] == "learner"):
        via, todo = {start: [start]}, [start]
        while todo:
            mod = todo.pop()
            for imp in edges[mod]:
                if imp.target in RVPO_MODULES:
                    bad.append(f"{' -> '.join(via[mod])} imports {imp.target} (line {imp.line})")
                elif (imp.target in names and imp.target not in via and not imp.deferred
                      and not imp.target.startswith("rvpo_async.config")):
                    via[imp.target] = via[mod] + [imp.target]
                    todo.append(imp.target)
    assert not bad, "\n".join(bad)


def test_no_source_file_exceeds_max_lines() -> None:
    long = {str(p.relative_to(ROOT)): n for p in project_modules().values()
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"files over {MAX_LINES} lines: {long}"


# ---------------------------------------------------------------- the checks themselves
def test_graph_reads_every_kind_of_import() -> None:
    src = ("from __future__ import annotations\nimport learner.engine\nfrom rvpo_async import config\n"
           "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from learner.actor import LearnerGroup\n"
           "try:\n    import ray\nexcept ImportError:\n    from actors import judges\n"
           "def f():\n    from rvpo_async.algo import advantages\n"
           "from . import checkpoint\n")
    names = {"learner", "learner.engine", "learner.actor", "learner.checkpoint", "rvpo_async", "rvpo_async.config",
             "rvpo_async.algo", "actors", "actors.judges"}
    got = {(i.target, i.deferred) for i in imports_of("learner.loss", src, names)}
    assert {("learner.engine", False), ("rvpo_async.config", False), ("ray", False), ("actors.judges", False),
            ("learner.actor", True), ("rvpo_async.algo", True), ("learner.checkpoint", False)} <= got
    assert ("learner", False) in got and ("typing", False) in got


def test_cycle_finder_names_a_cycle_through_each_tangle() -> None:
    graph = {"a": {"b": 1}, "b": {"c": 2}, "c": {"a": 3, "d": 4}, "d": {}, "e": {"f": 5}, "f": {"e": 6}}
    assert sorted(describe(graph, c) for c in cycles(graph)) == [
        "a (line 1) -> b (line 2) -> c (line 3) -> a", "e (line 5) -> f (line 6) -> e"]
    assert cycles({"a": {"b": 1}, "b": {}}) == []
