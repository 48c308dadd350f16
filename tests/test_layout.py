"""The package's shape: packages that import downward only and a labelling driver without torch
(import-linter's contracts in pyproject.toml), no import cycles between modules, lazy imports
included, and modules small enough to read."""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

import ray_fer

PACKAGE = Path(ray_fer.__file__).parent
REPO = PACKAGE.parent
PACKAGES = ("ray_fer.cli", "ray_fer.train", "ray_fer.label", "ray_fer.video", "ray_fer.faces", "ray_fer.store")
MAX_LINES = 550


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(path: Path, known: set[str]) -> set[str]:
    """ray_fer modules that `path` imports anywhere (top level or inside functions)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ray_fer"):
            for alias in node.names:  # from ray_fer.store import storage: a module; from ray_fer.x import f: x
                full = f"{node.module}.{alias.name}"
                found.add(full if full in known else node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("ray_fer.")}
    return {m for m in found if m in known and not m.endswith("__init__")} - {_module_name(path), "ray_fer"}


def test_the_import_contracts_hold():
    """lint-imports checks pyproject.toml's contracts: the layers cli > train > label > faces >
    store (store imports neither labelling nor training; labelling does not import training) and
    a labelling driver that imports no torch."""
    contracts = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    layers = next(c for c in contracts if c["type"] == "layers")
    assert tuple(layers["layers"]) == PACKAGES
    driver = next(c for c in contracts if c["type"] == "forbidden")
    assert "torch" in driver["forbidden_modules"] and "ray_fer.label.infer" in driver["source_modules"]
    done = subprocess.run([str(Path(sys.executable).parent / "lint-imports"), "--no-cache"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout and f"{len(contracts)} kept" in done.stdout


def test_no_import_cycles_between_modules():
    modules = _modules()
    graph = {name: _imports(path, set(modules)) for name, path in modules.items()}
    assert graph["ray_fer.train.trainer"] and graph["ray_fer.label.infer"], "no imports found: the test would prove nothing"
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(module):] + [module]))
        if module in done:
            return
        for dep in sorted(graph.get(module, ())):
            visit(dep, path + [module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])


def test_modules_stay_small_and_every_one_is_mapped_in_the_architecture_doc():
    architecture = (REPO / "docs" / "architecture.md").read_text()
    for name, path in _modules().items():
        lines = len(path.read_text().splitlines())
        assert lines <= MAX_LINES, f"{path} has {lines} lines: split it where its ideas part"
        if path.name == "__init__.py":
            continue
        parts = path.relative_to(PACKAGE).parts  # ("labels.py",) or ("label", "infer.py")
        section = architecture.find(f"  {parts[0]}/ ") if len(parts) > 1 else 0  # a package's block
        assert section >= 0 and f" {parts[-1]} " in architecture[section:], f"docs/architecture.md does not map {name}"
