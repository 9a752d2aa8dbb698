"""The architecture as rules: which layer may import which, no import cycles, and a server that loads nothing only
training needs."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("model", "service")

# layer -> the layers it must never import (lower layers never import upper ones)
FORBIDDEN = {
    "model": ("model.training", "service"),
    "model.training": ("service",),
    "service.backends": ("service.engine", "service.api", "service.app", "service.cli", "service.settings"),
    "service.engine": ("service.api", "service.app", "service.cli", "service.settings"),
    "service.api": ("service.app", "service.cli"),
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every module of ours that `path` imports, at any depth of the file (lazy imports count too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in found if name.split(".")[0] in PACKAGES}


MODULES = {module_name(p): p for package in PACKAGES for p in (ROOT / package).rglob("*.py")}
GRAPH = {name: {i for i in imports(path) if i in MODULES and i != name} for name, path in MODULES.items()}


def layer_of(module: str) -> str | None:
    return max((layer for layer in FORBIDDEN if module == layer or module.startswith(layer + ".")), key=len,
               default=None)


def test_the_layers_exist_and_cover_every_module():
    assert {"model.training", "service.api", "service.engine", "service.backends.cpu"} <= set(MODULES)
    assert all(layer_of(m) is not None for m in MODULES if m.startswith(("model", "service."))
               and m not in ("service.app", "service.cli", "service.settings", "service.__main__"))


def upward_imports(module: str, imported: set[str]) -> list[str]:
    layer = layer_of(module)
    forbidden = FORBIDDEN.get(layer, ()) if layer else ()
    return sorted(i for i in imported if any(i == f or i.startswith(f + ".") for f in forbidden))


@pytest.mark.parametrize("module", sorted(MODULES))
def test_lower_layers_never_import_upper_ones(module):
    assert not upward_imports(module, GRAPH[module]), f"{module} imports {upward_imports(module, GRAPH[module])}"


def test_no_import_cycles():
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(GRAPH[module]):
            if state.get(target) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(target):] + [target]))
            if target not in state:
                visit(target, path + [target])
        state[module] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module, [module])


def test_the_rule_checker_sees_a_violation():
    """The checks above would catch an upward import (so their passing means something)."""
    assert upward_imports("model.kv_cache", {"service.backends.cpu.pages"}) == ["service.backends.cpu.pages"]
    assert upward_imports("model.model", {"model.training.config"}) == ["model.training.config"]
    assert upward_imports("service.engine.engine", {"service.api.errors", "model.model"}) == ["service.api.errors"]
    assert upward_imports("service.api.generation", GRAPH["service.api.generation"]) == []
    assert "service.engine.engine" in GRAPH["service.api.generation"]  # the graph sees real imports


def test_the_server_runs_without_what_only_training_needs():
    """tqdm and matplotlib are the `train` extra: the server imports (and loads a model) with both missing."""
    script = ("import sys; sys.modules.update(tqdm=None, matplotlib=None); "  # None: `import tqdm` raises
              "import service.app, service.cli, service.engine.engine; from model.checkpoint import load_checkpoint; "
              "load_checkpoint('checkpoints/default'); print(sorted(m for m, v in sys.modules.items() if v is not None "
              "and m.startswith(('model.training', 'matplotlib', 'tqdm'))))")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stderr[-2000:]
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert not [d for d in dependencies if d.startswith(("tqdm", "matplotlib"))]
