"""The package's import graph is acyclic: no faithful_vit module imports, even lazily, one that imports it back."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Source folder -> the package it installs as (pyproject's package-dir).
PACKAGE_DIRS = {"faithful_vit": ROOT / "faithful_vit", "faithful_vit.kernels": ROOT / "kernels"}


def package_modules() -> dict[str, Path]:
    """Dotted name -> file of every module of the installed packages (a package is its ``__init__.py``)."""
    modules = {}
    for package, folder in PACKAGE_DIRS.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join((package, *parts))] = path
    return modules


def imported_modules(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules that ``name`` imports anywhere in its file (top level, in functions, for type checking)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                # `from package import module` imports that module; `from module import name` the module itself.
                submodule = f"{base}.{alias.name}"
                targets.add(submodule if submodule in modules else base)
    return {target for target in targets if target in modules and target != name}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path ``[a, b, ..., a]``, or None if it is acyclic (depth-first search)."""
    done: set[str] = set()
    for start in sorted(graph):
        if start in done:
            continue
        stack, path, on_path = [(start, iter(sorted(graph[start])))], [start], {start}
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                stack.pop()
                path.pop()
                on_path.discard(node)
                done.add(node)
            elif child in on_path:
                return path[path.index(child) :] + [child]
            elif child not in done:
                stack.append((child, iter(sorted(graph[child]))))
                path.append(child)
                on_path.add(child)
    return None


def test_find_cycle_finds_a_cycle_and_only_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_relative_and_lazy_imports_are_edges(tmp_path):
    (tmp_path / "pkg").mkdir()
    module = tmp_path / "pkg" / "mod.py"
    module.write_text("from . import other\n\ndef f():\n    from .sub.leaf import g\n")
    modules = {"pkg": tmp_path / "pkg" / "__init__.py", "pkg.mod": module, "pkg.other": module, "pkg.sub.leaf": module}
    assert imported_modules("pkg.mod", module, modules) == {"pkg.other", "pkg.sub.leaf"}


def test_import_graph_is_acyclic():
    modules = package_modules()
    assert {"faithful_vit.model", "faithful_vit.losses", "faithful_vit.kernels", "faithful_vit.data"} <= set(modules)
    graph = {name: imported_modules(name, path, modules) for name, path in modules.items()}
    assert "faithful_vit.sparsify" in graph["faithful_vit.model"]  # the graph sees the package's own imports
    cycle = find_cycle(graph)
    assert cycle is None, f"import cycle: {' -> '.join(cycle)}"


def test_losses_are_a_function_of_outputs_and_the_model_does_not_import_them():
    modules = package_modules()
    graph = {name: imported_modules(name, path, modules) for name, path in modules.items()}
    assert "faithful_vit.losses" not in graph["faithful_vit.model"]
    assert "faithful_vit.losses" not in graph["faithful_vit.baseline"]
    assert "faithful_vit.model" not in graph["faithful_vit.losses"]
    assert "faithful_vit.model_protocol" in graph["faithful_vit.losses"]  # the graph sees what losses does import
    assert graph["faithful_vit.model_protocol"] == set()  # the contract depends on no model
