"""Package layout: no import cycles inside rpcframe, and a grpc-free ``_core``.

The import graph is read from the source with :mod:`ast`, so it sees every
module whether or not a test imports it. Only module-level imports count
(including those under ``if TYPE_CHECKING:``, which mypy and readers follow
too); an import inside a function runs on first use and is the sanctioned way
to defer an optional dependency.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import rpcframe

PACKAGE_DIR = Path(rpcframe.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE_DIR.rglob("*.py"))}


def _module_level_imports(tree: ast.Module) -> Iterator[ast.Import | ast.ImportFrom]:
    """Imports run when the module is imported: top level and inside module-level if/try blocks."""
    pending: list[ast.stmt] = list(tree.body)
    while pending:
        node = pending.pop()
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        elif isinstance(node, ast.If | ast.Try):
            pending.extend(node.body + node.orelse)
            pending.extend(getattr(node, "finalbody", []))
            for handler in getattr(node, "handlers", []):
                pending.extend(handler.body)


def _resolve(module: str, node: ast.ImportFrom) -> str:
    """The absolute name ``from <...> import`` refers to, as seen from ``module``."""
    if node.level == 0:
        return node.module or ""
    is_package = MODULES[module].name == "__init__.py"
    base = module.split(".")
    base = base[: len(base) - node.level + (1 if is_package else 0)]
    return ".".join(base + ([node.module] if node.module else []))


def _targets(module: str, node: ast.Import | ast.ImportFrom) -> Iterator[str]:
    if isinstance(node, ast.Import):
        yield from (alias.name for alias in node.names)
        return
    source = _resolve(module, node)
    for alias in node.names:
        # `from pkg import sub` imports the submodule when there is one, else a name of pkg.
        submodule = f"{source}.{alias.name}"
        yield submodule if submodule in MODULES else source


def import_graph() -> dict[str, set[str]]:
    """rpcframe module -> the rpcframe modules it imports at module level."""
    graph: dict[str, set[str]] = {}
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text(), str(path))
        graph[name] = {
            target
            for node in _module_level_imports(tree)
            for target in _targets(name, node)
            if target in MODULES and target != name
        }
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path that ends where it starts, or ``None``."""
    done: set[str] = set()
    path: list[str] = []
    on_path: set[str] = set()

    def visit(node: str) -> list[str] | None:
        path.append(node)
        on_path.add(node)
        for target in sorted(graph[node]):
            if target in on_path:
                return path[path.index(target) :] + [target]
            if target not in done and (cycle := visit(target)) is not None:
                return cycle
        on_path.discard(path.pop())
        done.add(node)
        return None

    for start in sorted(graph):
        if start not in done and (cycle := visit(start)) is not None:
            return cycle
    return None


def test_the_graph_sees_known_edges() -> None:
    graph = import_graph()
    assert "rpcframe.balancing.endpoint" in graph["rpcframe.balancing.balancer"]
    assert "rpcframe.client._common" in graph["rpcframe.client._sync"]
    assert "rpcframe.errors" in graph["rpcframe"]


def test_find_cycle_reports_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_between_rpcframe_modules() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


CORE_MODULES = sorted(name for name in MODULES if name.startswith("rpcframe._core"))


@pytest.mark.parametrize("module", CORE_MODULES)
def test_core_module_imports_without_grpc(module: str) -> None:
    # A fresh interpreter: this one has grpc loaded already.
    code = f"import sys, {module}; assert 'grpc' not in sys.modules, sorted(m for m in sys.modules if 'grpc' in m)"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=PACKAGE_DIR.parent, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
