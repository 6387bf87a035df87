"""The package's import graph has no cycle: leaf modules (the op-call API, predicates, the registry) carry
what rules, rewrite, verify and the passes share, so no module needs a function-local import to load."""
from __future__ import annotations

import ast
from pathlib import Path

import fxprune
import fxprune.passes

PACKAGES = {"fxprune": Path(fxprune.__file__).parent, "fxprune.passes": Path(fxprune.passes.__file__).parent}


def _modules() -> dict[str, Path]:
    out = {}
    for package, root in PACKAGES.items():
        for path in root.rglob("*.py"):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[0] == "passes" and package == "fxprune":  # a link to the passes package
                continue
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join([package, *parts])] = path
    return out


def _is_type_checking(node: ast.If) -> bool:
    return isinstance(node.test, (ast.Name, ast.Attribute)) and ast.unparse(node.test).endswith("TYPE_CHECKING")


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Every fxprune module ``name`` imports, at module level or inside a function, except under
    ``if TYPE_CHECKING:`` (never run)."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    tree = ast.parse(path.read_text())
    skipped = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If) and _is_type_checking(block)
               for n in ast.walk(block)}
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[: len(package) - node.level + 1] + [node.module or ""]) if node.level \
                else node.module or ""
            base = base.rstrip(".")
            found.update(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names)
    if path.name == "__init__.py" and "pkgutil.iter_modules" in path.read_text():  # fxprune.core.rules imports
        found.update(m for m in modules if m.rpartition(".")[0] == name)     # every module of its package
    return {m for m in found if m in modules and m != name}


def _cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle, as a path of module names, or [] (depth-first search with colours)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(module: str) -> list[str]:
        state[module] = 1
        stack.append(module)
        for other in sorted(graph[module]):
            if state.get(other) == 1:
                return stack[stack.index(other):] + [other]
            if other not in state:
                found = visit(other)
                if found:
                    return found
        state[module] = 2
        stack.pop()
        return []

    for module in sorted(graph):
        if module not in state:
            found = visit(module)
            if found:
                return found
    return []


def test_the_import_graph_has_no_cycle():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    assert "fxprune.core.rules.conv" in graph and "fxprune.passes.prune_channels" in graph  # the walk found them
    assert _cycle(graph) == [], " -> ".join(_cycle(graph))


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) == []


def test_the_rule_package_counts_as_importing_every_family():
    modules = _modules()
    assert {"fxprune.core.rules.conv", "fxprune.core.rules.shape"} <= _imports("fxprune.core.rules", modules["fxprune.core.rules"], modules)


def test_the_shared_helpers_are_leaves():
    modules = _modules()
    leaves = ("fxprune.core.predicates", "fxprune.core.registry", "fxprune.core.channels", "fxprune.core.graph", "fxprune.options")
    for leaf in leaves:
        assert _imports(leaf, modules[leaf], modules) <= {"fxprune.errors"}, leaf
    # the op-call API the rules use stands on the leaves only: not on the walk, capture or groups
    assert _imports("fxprune.core.opcall", modules["fxprune.core.opcall"], modules) <= set(leaves) | {"fxprune.errors"}


def test_rules_import_the_op_call_api_not_the_walk():
    modules = _modules()
    for name in [m for m in modules if m.startswith("fxprune.core.rules.")]:
        assert "fxprune.analysis" not in _imports(name, modules[name], modules), name
