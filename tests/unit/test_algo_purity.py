"""The math core stays pure: importing it loads no heavy framework and its code makes no
torch.distributed call (checked on the syntax tree, so the docstring may mention it)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("ray", "vllm", "deepspeed", "transformers")


def _loaded_after_import(module: str, watched: tuple[str, ...]) -> list[str]:
    """Top-level packages from `watched` present in sys.modules after importing `module` afresh."""
    code = (
        "import json, sys\n"
        f"import {module}\n"
        f"watched = {list(watched)!r}\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules} & set(watched))))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _docstring_nodes(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                ids.add(id(body[0].value))
    return ids


def _dotted(node: ast.AST) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return None


def distributed_uses(source: str) -> list[str]:
    """Every place the code imports or touches torch.distributed (or names it in a string)."""
    tree = ast.parse(source)
    docstrings = _docstring_nodes(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.startswith("torch.distributed")]
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if mod.startswith("torch.distributed") or (mod == "torch" and any(a.name == "distributed"
                                                                              for a in node.names)):
                found.append(f"from {mod} import ...")
        elif isinstance(node, ast.Attribute):
            name = _dotted(node)
            if name and (name == "torch.distributed" or name.startswith("torch.distributed.")):
                found.append(name)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            if "distributed" in node.value:
                found.append(repr(node.value))
    return found


def imported_modules(source: str) -> set[str]:
    tree = ast.parse(source)
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("module", ["rvpo_async.algo", "rvpo_async.staleness", "rvpo_async.schedule",
                                    "rvpo_async.algo_weights", "rvpo_async.run_state", "rvpo_async.study_stats"])
def test_import_loads_no_heavy_framework(module):
    assert _loaded_after_import(module, HEAVY) == []


@pytest.mark.parametrize("module", ["rvpo_async.staleness", "rvpo_async.schedule"])
def test_rule_module_import_loads_no_torch(module):
    assert _loaded_after_import(module, ("torch",)) == []


@pytest.mark.parametrize("path", ["rvpo_async/algo.py", "rvpo_async/staleness.py", "rvpo_async/algo_weights.py"])
def test_module_code_makes_no_torch_distributed_use(path):
    assert distributed_uses((ROOT / path).read_text()) == []


def test_staleness_code_imports_no_torch():
    assert "torch" not in imported_modules((ROOT / "rvpo_async/staleness.py").read_text())


@pytest.mark.parametrize("snippet", [
    "import torch.distributed as dist",
    "from torch import distributed",
    "from torch.distributed import all_reduce",
    "import torch\ntorch.distributed.all_reduce(x)",
    "import torch\nif torch.distributed.is_initialized(): pass",
    "import importlib\nimportlib.import_module('torch.distributed')",
    "import torch\ngetattr(torch, 'distributed')",
])
def test_distributed_check_detects_each_form_of_use(snippet):
    assert distributed_uses(snippet)


def test_distributed_check_ignores_docstrings():
    assert distributed_uses('"""Makes no torch.distributed call."""\nimport torch\n') == []


def test_import_probe_reports_packages_the_import_loads():
    assert _loaded_after_import("rvpo_async.algo", ("torch", "ray")) == ["torch"]
