"""The package's shape: modules import each other without cycles, lazy imports included."""

from __future__ import annotations

import ast
from pathlib import Path

import ray_fer

PACKAGE = Path(ray_fer.__file__).parent


def _imports(path: Path) -> set[str]:
    """ray_fer modules that `path` imports anywhere (top level or inside functions)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ray_fer"):
            if node.module == "ray_fer":  # from ray_fer import storage, __version__
                found |= {a.name for a in node.names if (PACKAGE / f"{a.name}.py").exists()}
            else:
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("ray_fer.")}
    return found - {path.stem}


def test_no_import_cycles():
    graph = {p.stem: _imports(p) for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    assert graph["train"] and graph["infer"], "the parser found no imports: the test would prove nothing"
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


def test_training_and_evaluation_do_not_import_each_other():
    assert "evaluate" not in _imports(PACKAGE / "train.py")
    assert "train" not in _imports(PACKAGE / "evaluate.py")
