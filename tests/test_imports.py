"""The package's import graph: layers and no cycle.

**Layers.** Every module sits in one layer of :data:`LAYERS` (lowest first) and imports, at module level
or inside a function, only modules of its own layer or of lower ones: the core never reaches into the
data-aware stages, the passes never into the one-call API, and nothing below the adapters imports an
adapter, a runtime, the CLI or the test support. A new adapter or runtime package is one entry of
:data:`ADAPTERS`; a new module outside every layer fails :func:`test_every_module_sits_in_a_layer`
until it is placed.

**No cycle.** Leaf modules (the op-call API, predicates, the registry) carry what rules, rewrite, verify
and the passes share, so no module needs a function-local import to load.
"""
from __future__ import annotations

import ast
from pathlib import Path


import fxprune

ROOT = Path(fxprune.__file__).parent

#: The framework adapters and the runtimes: one entry per package (``fxprune.hf`` and its modules ...).
ADAPTERS = ("fxprune.hf", "fxprune.deploy")

#: The layers, lowest first: a module imports its own layer and the ones below, never one above. A name
#: covers the module and everything under it; ``fxprune.stages`` counts once it exists.
LAYERS = (
    ("leaves", ("fxprune.errors", "fxprune.options", "fxprune.progress", "fxprune.safe_files")),
    ("core", ("fxprune.core",)),
    ("data", ("fxprune.data",)),
    ("stages", ("fxprune.stages",)),
    ("passes", ("fxprune.passes",)),
    # the same-class output of the API (``output="module"``) sits beside it: it builds on fxprune.stages
    ("api", ("fxprune.api", "fxprune.io", "fxprune.measure", "fxprune.module")),
    ("adapters", ADAPTERS),
    ("tools", ("fxprune.cli", "fxprune.testing", "fxprune")),  # ``fxprune`` alone (not its modules) re-exports
)


def _modules() -> dict[str, Path]:
    """Every module of the package, by dotted name (a package by its ``__init__.py``)."""
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(["fxprune", *parts])] = path
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
    graph = _graph()
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
    # lockstep (chunk pieces that keep equal widths) stands on the channel table alone
    assert _imports("fxprune.core.lockstep", modules["fxprune.core.lockstep"], modules) <= {
        "fxprune.core.channels", "fxprune.errors"}
    # the op-call API the rules use stands on the leaves and lockstep only: not on the walk, capture or groups
    assert _imports("fxprune.core.opcall", modules["fxprune.core.opcall"], modules) <= set(leaves) | {
        "fxprune.errors", "fxprune.core.lockstep"}


def test_rules_import_the_op_call_api_not_the_walk():
    modules = _modules()
    for name in [m for m in modules if m.startswith("fxprune.core.rules.")]:
        assert "fxprune.core.analysis" not in _imports(name, modules[name], modules), name


# ---------------------------------------------------------------- layers


def _layer(module: str) -> int | None:
    """The rank in :data:`LAYERS` of the layer holding ``module`` (its longest covering name), or None."""
    covering = [(len(name), rank) for rank, (_, names) in enumerate(LAYERS) for name in names
                if module == name or (name != "fxprune" and module.startswith(name + "."))]
    return max(covering)[1] if covering else None


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _rank(layer: str) -> int:
    return [name for name, _ in LAYERS].index(layer)


def _in(layers: tuple[str, ...], module: str) -> bool:
    rank = _layer(module)
    return rank is not None and LAYERS[rank][0] in layers


def _imports_of(graph: dict[str, set[str]], importers: tuple[str, ...],
                imported: tuple[str, ...]) -> list[tuple[str, str]]:
    """Each (importer, imported) pair with the importer in a layer of ``importers`` and the imported
    module in a layer of ``imported``."""
    return sorted((m, other) for m, others in graph.items() if _in(importers, m)
                  for other in others if _in(imported, other))


def _above(layer: str) -> tuple[str, ...]:
    return tuple(name for name, _ in LAYERS[_rank(layer) + 1:])


def test_every_module_sits_in_a_layer():
    modules = _modules()
    assert "fxprune.core.rules.conv" in modules and "fxprune.passes.prune_channels" in modules  # the walk found them
    assert [m for m in modules if _layer(m) is None] == []


def test_the_leaves_import_only_each_other():
    assert _imports_of(_graph(), ("leaves",), _above("leaves")) == []


def test_the_core_imports_only_the_core_and_the_leaves():
    assert _imports_of(_graph(), ("core",), _above("core")) == []


def test_the_data_stages_import_nothing_above_them():
    assert _imports_of(_graph(), ("data",), _above("data")) == []


def test_the_stage_composition_imports_nothing_above_it():
    assert "fxprune.stages" in _modules()
    assert _imports_of(_graph(), ("stages",), _above("stages")) == []


def test_the_passes_never_import_the_one_call_api():
    assert _imports_of(_graph(), ("passes",), _above("passes")) == []


def test_the_api_imports_no_adapter_runtime_cli_or_test_support():
    assert _imports_of(_graph(), ("api",), _above("api")) == []


def test_nothing_below_the_adapters_imports_an_adapter_runtime_cli_or_test_support():
    below = tuple(name for name, _ in LAYERS[:_rank("adapters")])
    assert _imports_of(_graph(), below, ("adapters", "tools")) == []


def test_the_adapters_import_no_cli_or_test_support():
    assert _imports_of(_graph(), ("adapters",), ("tools",)) == []


def test_the_layer_check_finds_an_upward_import():
    # a fake graph: core reaching into the API, a pass into the API and the HF adapter, data into a pass
    graph = {"fxprune.core.plan": {"fxprune.api", "fxprune.errors"}, "fxprune.api": {"fxprune.core.plan"},
             "fxprune.passes.prune_channels": {"fxprune.api", "fxprune.hf.policy", "fxprune.core.plan"},
             "fxprune.data.criteria": {"fxprune.passes.pipeline", "fxprune.core.plan"},
             "fxprune.stages": {"fxprune.data.criteria"}, "fxprune.hf.policy": {"fxprune.cli.format"}}
    assert _imports_of(graph, ("core",), _above("core")) == [("fxprune.core.plan", "fxprune.api")]
    assert _imports_of(graph, ("passes",), _above("passes")) == [("fxprune.passes.prune_channels", "fxprune.api"),
                                                               ("fxprune.passes.prune_channels", "fxprune.hf.policy")]
    assert _imports_of(graph, ("data",), _above("data")) == [("fxprune.data.criteria", "fxprune.passes.pipeline")]
    assert _imports_of(graph, ("stages",), _above("stages")) == []
    assert _imports_of(graph, ("adapters",), ("tools",)) == [("fxprune.hf.policy", "fxprune.cli.format")]
    below = tuple(name for name, _ in LAYERS[:_rank("adapters")])
    assert _imports_of(graph, below, ("adapters", "tools")) == [("fxprune.passes.prune_channels", "fxprune.hf.policy")]


def test_a_module_is_in_the_layer_of_its_longest_name():
    assert [LAYERS[_layer(m)][0] for m in ("fxprune", "fxprune.core.rules.conv", "fxprune.options",
                                             "fxprune.passes", "fxprune.hf.policy", "fxprune.measure")] \
        == ["tools", "core", "leaves", "passes", "adapters", "api"]
    assert _layer("fxprune_extra.core") is None and _layer("torch") is None and _layer("fxprune.unplaced") is None
