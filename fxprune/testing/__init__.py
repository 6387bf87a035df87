"""Golden tests of graph modules: a normalized text report and a syrupy snapshot fixture.

Why a report and not ``gm.code``: a module-level prune (a smaller ``Conv2d`` swapped in) leaves
``gm.code`` unchanged, and raw code carries noise that changes between runs and torch releases.
``normalized_report(gm)`` is the generated code, normalized, followed by the sizes that a prune
changes:

- **code**: ``gm.code`` with comments, trailing whitespace, the ``x = None`` dead-value tails and
  the annotations of ``forward``'s signature removed, blank lines collapsed, memory addresses
  (``0x7f...``) masked. For export-level modules (``torch.export.export(...).module()``) the
  input pytree line and the ``_guards_fn`` call are dropped and ``return pytree.tree_unflatten((a, b), self._out_spec)`` becomes ``return (a, b)``.
  Only the top-level code is printed; nested graph modules show up through their tensors.
- **modules**: every leaf module as ``name: ClassName(extra_repr)`` (``in_channels``,
  ``out_features``, ...), sorted by name; export's plain ``nn.Module`` holders are skipped.
- **parameters** and **buffers**: ``name: dtype shape``, sorted by name.
- **node shapes** (``node_shapes=True``): each node's output dtype and shape, from
  ``node.meta["val"]`` (fake tensors, export) or ``node.meta["tensor_meta"]`` (``ShapeProp``);
  ``?`` marks a node without metadata.

The pytest plugin (entry point ``pytest11: fxprune``) adds the ``graph_snapshot`` fixture: syrupy's
``snapshot`` using ``FxTextExtension``, which writes one ``.fx.txt`` file per assertion under
``__snapshots__/<test file>/`` (never ``.py``: pytest would collect ``test_*.py`` snapshots). It
accepts a ``GraphModule``, an ``ExportedProgram`` or an already-built report string::

    def test_prune_channels(graph_snapshot):
        gm = torch.fx.symbolic_trace(Net())
        pruned = PruneChannels(sparsity=0.5)(gm).graph_module
        assert pruned == graph_snapshot    # __snapshots__/<file>/test_prune_channels.fx.txt
        assert normalized_report(pruned, node_shapes=True) == graph_snapshot(name="shapes")

A mismatch fails with syrupy's line diff of the two reports. Create or accept snapshots with
``pytest --snapshot-update`` and read every diff before committing it.

Importing this module is cheap and safe: torch is imported inside the functions that need it, and
without syrupy the module still loads; only using ``graph_snapshot`` then fails, with a message
saying what to install.
"""

from __future__ import annotations

import ast
import io
import re
import tokenize
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    import torch
    from syrupy.assertion import SnapshotAssertion

__all__ = ["normalized_report", "normalized_code", "graph_snapshot"]

_ADDRESS = re.compile(r"\b0x[0-9a-fA-F]{6,}\b")
_DEAD_VALUE = re.compile(r"^(\w+ = )+None$")  # `a = b = None`: fx frees dead values early
_PYTREE_RETURN = re.compile(r"^(\s*)return pytree\.tree_unflatten\((.*), self\._out_spec\)$")
_DROPPED_LINE_MARKERS = ("fx_pytree.tree_flatten_spec", "self._guards_fn(")
_DROPPED_MODULES = frozenset({"_guards_fn"})  # export's guard checker: not part of the model


# ---------------------------------------------------------------- the report


def normalized_report(gm: torch.fx.GraphModule, *, node_shapes: bool = False) -> str:
    """A stable text report of ``gm``: normalized code, leaf modules, parameters, buffers
    and (optionally) every node's output shape. Same graph module -> same string."""
    sections = [
        normalized_code(gm.code),
        _section("modules", _module_lines(gm)),
        _section("parameters", _tensor_lines(gm.named_parameters())),
        _section("buffers", _tensor_lines(gm.named_buffers())),
    ]
    if node_shapes:
        sections.append(_section("node shapes", _node_shape_lines(gm)))
    return "\n\n".join(sections) + "\n"


def normalized_code(code: str) -> str:
    """``gm.code`` without comments, dead-value tails, pytree plumbing and blank-line runs."""
    lines = []
    for line in _strip_comments(code).splitlines():
        line = _normalize_line(line)
        if line is not None and (line or (lines and lines[-1])):
            lines.append(line)
    return "\n".join(lines).strip("\n")


def _normalize_line(line: str) -> str | None:
    """One line of code, normalized; ``None`` drops it."""
    if any(marker in line for marker in _DROPPED_LINE_MARKERS):
        return None
    if line.startswith("def "):
        return _unannotated_def(line)
    indent = line[: len(line) - len(line.lstrip())]
    kept = [s for s in line.strip().split(";  ") if not _DEAD_VALUE.match(s)]
    if not kept:
        return None
    line = _ADDRESS.sub("0x?", indent + ";  ".join(kept)).rstrip()
    return _PYTREE_RETURN.sub(r"\1return \2", line)


def _unannotated_def(line: str) -> str:
    """``def forward(self, x : _torch_Tensor_) -> _torch_Tensor_:`` -> ``def forward(self, x):``.

    fx spells the user's annotations differently across releases; they say nothing about a prune."""
    try:
        function = ast.parse(line + "\n    pass").body[0]
    except SyntaxError:
        return line.rstrip()
    assert isinstance(function, ast.FunctionDef)
    function.returns = None
    for arg in ast.walk(function.args):
        if isinstance(arg, ast.arg):
            arg.annotation = None
    return ast.unparse(function).splitlines()[0]


def _strip_comments(code: str) -> str:
    """Remove ``#`` comments (found with the tokenizer, so ``"#"`` in strings survives)."""
    lines = code.splitlines(keepends=True)
    for row, col in _comment_starts(code):
        code_part = lines[row - 1][:col].rstrip()
        lines[row - 1] = code_part + "\n" if code_part else ""  # a comment line goes entirely
    return "".join(lines)


def _comment_starts(code: str) -> list[tuple[int, int]]:
    readline = io.StringIO(code).readline
    try:
        return [t.start for t in tokenize.generate_tokens(readline) if t.type == tokenize.COMMENT]
    except (tokenize.TokenError, SyntaxError):  # not Python: keep the text as it is
        return []


def _section(title: str, lines: Iterable[str]) -> str:
    body = [f"  {line}" for line in lines] or ["  (none)"]
    return "\n".join([f"{title}:", *body])


def _module_lines(gm: torch.fx.GraphModule) -> list[str]:
    return sorted(
        f"{name}: {type(module).__name__}({_one_line(module.extra_repr())})"
        for name, module in gm.named_modules()
        if _is_reported_leaf(name, module)
    )


def _is_reported_leaf(name: str, module: torch.nn.Module) -> bool:
    import torch

    if next(module.children(), None) is not None or name.split(".")[-1] in _DROPPED_MODULES:
        return False
    # export keeps parameters on plain nn.Module holders; nested graph modules show up as code
    return type(module) is not torch.nn.Module and not isinstance(module, torch.fx.GraphModule)


def _one_line(text: str) -> str:
    return _ADDRESS.sub("0x?", " ".join(text.split()))


def _tensor_lines(named: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
    return sorted(f"{name}: {_dtype_shape(t.dtype, t.shape)}" for name, t in named)


def _dtype_shape(dtype: torch.dtype, shape: Iterable[Any]) -> str:
    dims = ", ".join(str(d) for d in shape)
    return f"{str(dtype).removeprefix('torch.')} [{dims}]"


def _node_shape_lines(gm: torch.fx.GraphModule) -> Iterator[str]:
    for node in gm.graph.nodes:
        if node.op != "output" and node.name not in _DROPPED_MODULES:
            yield f"{node.name}: {_describe_value(_node_value(node))}"


def _node_value(node: torch.fx.Node) -> Any:
    if node.meta.get("val") is not None:
        return node.meta["val"]
    return node.meta.get("tensor_meta")


def _describe_value(value: Any) -> str:
    """``float32 [2, 8]`` for a tensor or TensorMetadata, ``(a, b)`` for tuples, ``?`` if none."""
    if value is None:
        return "?"
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        return _dtype_shape(value.dtype, value.shape)
    if isinstance(value, (tuple, list)):
        return "(" + ", ".join(_describe_value(v) for v in value) + ")"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_describe_value(v)}" for k, v in value.items()) + "}"
    return _ADDRESS.sub("0x?", type(value).__name__ + " " + str(value))


# ---------------------------------------------------------------- syrupy extension and fixture


def _report_of(data: Any) -> str:
    """What a snapshot stores for ``data``: a report string is kept as given."""
    import torch

    if isinstance(data, str):
        return data
    if isinstance(data, torch.export.ExportedProgram):
        data = data.module()
    if isinstance(data, torch.fx.GraphModule):
        return normalized_report(data)
    raise TypeError(
        f"graph_snapshot compares a GraphModule, an ExportedProgram or a normalized_report "
        f"string, not {type(data).__name__}; trace it first (torch.fx.symbolic_trace)"
    )


try:
    from syrupy.extensions.single_file import SingleFileSnapshotExtension, WriteMode
except ImportError:  # syrupy is optional: only `graph_snapshot` needs it
    pass
else:

    class FxTextExtension(SingleFileSnapshotExtension):
        """One ``.fx.txt`` text file per snapshot, holding a ``normalized_report``."""

        file_extension = "fx.txt"
        _write_mode = WriteMode.TEXT

        def serialize(self, data: Any, **kwargs: Any) -> str:
            return _report_of(data)

    __all__ += ["FxTextExtension"]


@pytest.fixture
def graph_snapshot(request: pytest.FixtureRequest) -> SnapshotAssertion:
    """syrupy's ``snapshot`` storing graph modules as ``.fx.txt`` normalized reports."""
    if not request.config.pluginmanager.has_plugin("syrupy"):
        pytest.fail(
            "the graph_snapshot fixture needs the syrupy pytest plugin: "
            "pip install 'syrupy>=4' (or drop `-p no:syrupy`)",
            pytrace=False,
        )
    return request.getfixturevalue("snapshot").use_extension(FxTextExtension)
