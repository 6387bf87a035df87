"""Residual blocks of a graph: find every ``y = x + f(x)``, and remove ``f`` exactly.

A **residual** is an add node whose one operand (the *shortcut* ``x``) is an ancestor of the other (the
*branch* ``f(x)``), all three of the same shape, with a parameter read on the branch (``f`` is a layer,
not ``x * 2``). Residuals are grouped into **blocks** by the module that owns the add (the innermost
entry of ``node.meta["nn_module_stack"]``, which both graph levels record): a LLaMA decoder layer is one
block of two residuals (attention, MLP), a ResNet basic block one of one. Adds made by the root module
itself are a block each, named after the node.

Removing a block replaces each of its adds by its shortcut, in graph order, and lets dead-code
elimination take the branch away, with the parameters only it read. The result equals the original
with those branches' contributions zeroed (:func:`zeroed_reference`: ``y = x + 0 · f(x)``), which is
what verify compares with. What is not a candidate is listed with the reason: an add whose two
operands are both computed from parameters (a downsampling or projection shortcut: removing the block
would change a shape or drop the projection), or a block that mixes such an add with residuals.

>>> found = find_blocks(capture(torchvision.models.resnet18().eval(), x).gm)            # doctest: +SKIP
>>> [b.name for b in found.blocks][:3], found.rejected[0]                               # doctest: +SKIP
(['layer1.0', 'layer1.1', 'layer2.1'], ('layer2.0', 'not a residual block: ...'))
>>> smaller = drop_blocks(gm, ("layer1.1",))                                            # doctest: +SKIP
"""
from __future__ import annotations

import copy
import operator
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Sequence

import torch
import torch.fx as fx

from fxprune.core.graph import meta_value
from fxprune.core.rewrite import build_graph_module
from fxprune.core.verify import reference_items
from fxprune.errors import InvalidOptionError

aten = torch.ops.aten
#: The spellings of ``a + b`` at both levels (an in-place add is functional in a captured graph).
ADDS = frozenset({operator.add, operator.iadd, torch.add, aten.add.Tensor, aten.add_.Tensor, "add", "add_"})


@dataclass(frozen=True)
class Residual:
    """One ``add = shortcut + branch`` (node names)."""

    add: str
    shortcut: str
    branch: str


@dataclass(frozen=True)
class Block:
    """Residuals removed together: the adds one module makes, in graph order."""

    name: str
    """The owning module's path (``model.layers.3``), or the add's node name for the root's adds."""
    residuals: tuple[Residual, ...]
    shape: tuple[int, ...]
    """The residual stream's shape at the example inputs."""

    @property
    def input(self) -> str:
        """The node the block reads the residual stream from."""
        return self.residuals[0].shortcut

    @property
    def output(self) -> str:
        """The node that holds the residual stream after the block."""
        return self.residuals[-1].add


@dataclass(frozen=True)
class Blocks:
    """What :func:`find_blocks` found: the candidates in graph order, and what is not one and why."""

    blocks: tuple[Block, ...]
    rejected: tuple[tuple[str, str], ...]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(b.name for b in self.blocks)

    def pick(self, names: Iterable[str]) -> tuple[Block, ...]:
        """The blocks named, in graph order; an unknown name is an ``InvalidOptionError``."""
        names = tuple(names)
        unknown = sorted(set(names) - set(self.names))
        if unknown:
            why = dict(self.rejected)
            shown = "; ".join(f"{n!r}: {why.get(n, 'no such block')}" for n in unknown[:3])
            raise InvalidOptionError(f"not a removable block: {shown} (blocks: {list(self.names)[:8]})")
        return tuple(b for b in self.blocks if b.name in names)


# --- finding -----------------------------------------------------------------------------------
def find_blocks(gm: fx.GraphModule, owner: Optional[Callable[[str], str]] = None) -> Blocks:
    """Every removable residual block of ``gm`` (a captured graph) and every rejected one.

    ``owner`` maps the module that makes an add to the block it belongs to (default: that module; the
    HF adapter maps ``model.layers.3.mlp`` to ``model.layers.3``)."""
    ancestors = _ancestors(gm.graph)
    found, refused = [], []
    for node in gm.graph.nodes:
        residual, reason = _residual(gm, node, ancestors) if _is_add(node) else (None, "")
        if residual is not None:
            found.append((node, residual))
        elif reason:
            refused.append((node, reason))
    inside = _branches(gm, ancestors, [r for _, r in found])  # a MoE's shared + routed add is no shortcut
    name = _owner if owner is None else (lambda node: owner(_owner(node)))
    owners: dict[str, list[Residual]] = {}
    for node, residual in found:
        owners.setdefault(name(node), []).append(residual)
    rejected: dict[str, str] = {}
    for node, reason in refused:
        if node not in inside:
            rejected.setdefault(name(node), reason)
    blocks = [Block(n, tuple(rs), _shape(gm, rs[0].add)) for n, rs in owners.items() if n not in rejected]
    why = [(n, reason if n not in owners else f"mixes residuals with {reason[len('not a residual block: '):]}")
           for n, reason in sorted(rejected.items())]
    return Blocks(tuple(blocks), tuple(why))


def _branches(gm: fx.GraphModule, ancestors: dict, residuals: list[Residual]) -> set[fx.Node]:
    """Every node computed inside some residual's branch (from its shortcut, up to the branch)."""
    nodes = {n.name: n for n in gm.graph.nodes}
    inside: set[fx.Node] = set()
    for r in residuals:
        branch, shortcut = nodes[r.branch], nodes[r.shortcut]
        inside |= (ancestors[branch] | {branch}) - ancestors[shortcut]
    return inside


def _is_add(node: fx.Node) -> bool:
    return node.op in ("call_function", "call_method") and node.target in ADDS and len(node.args) == 2 \
        and node.kwargs.get("alpha", 1) == 1


def _ancestors(graph: fx.Graph) -> dict[fx.Node, frozenset]:
    """Every node's transitive inputs (node sets; graphs are topologically ordered)."""
    out: dict[fx.Node, frozenset] = {}
    for node in graph.nodes:
        direct = node.all_input_nodes
        out[node] = frozenset(direct).union(*(out[d] for d in direct))
    return out


def _residual(gm: fx.GraphModule, node: fx.Node, ancestors: dict) -> tuple[Optional[Residual], str]:
    a, b = node.args
    if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)) or not _same_shapes(node, a, b):
        return None, ""
    upto = {n: ancestors[n] | {n} for n in (a, b)}
    for shortcut, branch in ((a, b), (b, a)):
        if shortcut in ancestors[branch] and _reads_parameters(gm, upto[branch] - upto[shortcut]):
            return Residual(node.name, shortcut.name, branch.name), ""
    if _reads_parameters(gm, upto[a] - upto[b]) and _reads_parameters(gm, upto[b] - upto[a]):
        return None, (f"not a residual block: add {node.name!r} has no identity shortcut (both operands are "
                      f"computed from parameters: a downsampling or projection shortcut)")
    return None, ""


def _same_shapes(*nodes: fx.Node) -> bool:
    values = [meta_value(n) if "val" in n.meta or "tensor_meta" in n.meta else None for n in nodes]
    shapes = {str(tuple(v.shape)) for v in values if hasattr(v, "shape")}  # SymInts print, never hash
    return len(shapes) == 1 and all(hasattr(v, "shape") for v in values)


def _reads_parameters(gm: fx.GraphModule, nodes: Iterable[fx.Node]) -> bool:
    for n in nodes:
        if n.op == "get_attr" and isinstance(_attr(gm, str(n.target)), torch.nn.Parameter):
            return True
        if n.op == "call_module" and any(True for _ in gm.get_submodule(n.target).parameters()):
            return True
    return False


def _attr(gm: torch.nn.Module, target: str) -> Any:
    value: Any = gm
    for part in target.split("."):
        value = getattr(value, part)
    return value


def _owner(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    path = next(reversed(stack.values()), ("",))[0] if stack else ""
    return _module_path(path) or node.name


def _module_path(path: str) -> str:
    """``L['self'].layers[3]`` (dynamo's spelling) or ``layers.3`` -> ``layers.3``."""
    for old, new in (("L['self'].", ""), ("L['self']", ""), ("[", "."), ("]", "")):
        path = path.replace(old, new)
    return path


def _shape(gm: fx.GraphModule, name: str) -> tuple[int, ...]:
    node = next(n for n in gm.graph.nodes if n.name == name)
    return tuple(int(s) if isinstance(s, int) else -1 for s in meta_value(node).shape)


# --- removing ----------------------------------------------------------------------------------
def without_blocks(gm: fx.GraphModule, blocks: Sequence[Block]) -> fx.Graph:
    """A copy of ``gm``'s graph in which each of ``blocks``' adds is its shortcut, dead code gone."""
    graph = copy.deepcopy(gm.graph)
    nodes = {n.name: n for n in graph.nodes}
    order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
    unused = {n.name for n in gm.graph.nodes if not n.users}  # export's guard check, a print: kept
    for residual in sorted((r for b in blocks for r in b.residuals), key=lambda r: order[r.add]):
        add, shortcut = nodes[residual.add], nodes[residual.shortcut]
        add.replace_all_uses_with(shortcut)
        graph.erase_node(add)
        nodes[residual.add] = shortcut  # the next residual of a block may read this add
    _remove_dead(graph, unused, tuple(b.name + "." for b in blocks))
    graph.lint()
    return graph


def _remove_dead(graph: fx.Graph, unused: set[str], dropped: tuple[str, ...]) -> None:
    """Erase every node the output no longer reads, except the nodes that read nothing dead and were
    never read (asserts, export's guards, unread buffers of kept modules). In-place ops count as functional: a captured eval graph mutates only
    its own intermediates (fx's ``eliminate_dead_code`` would keep a dead branch's ``relu_``)."""
    live = {graph.output_node()}
    for node in reversed(graph.nodes):
        if node in live:
            live.update(node.all_input_nodes)
    for node in graph.nodes:
        if node.name in unused and set(node.all_input_nodes) <= live and not str(node.target).startswith(dropped):
            live.add(node)
    for node in reversed(list(graph.nodes)):
        if node not in live and node.op != "placeholder":
            graph.erase_node(node)


def skipping(gm: fx.GraphModule, blocks: Sequence[Block]) -> fx.GraphModule:
    """``gm`` without ``blocks``, sharing ``gm``'s tensors (cheap: for scoring a removal)."""
    graph = without_blocks(gm, blocks)
    return build_graph_module(gm, graph, reference_items(gm, graph, {}))


def drop_blocks(gm: fx.GraphModule, blocks: Sequence[Block]) -> fx.GraphModule:
    """A new GraphModule: ``gm`` without ``blocks``, with new tensors (the input is untouched)."""
    graph = without_blocks(gm, blocks)
    return build_graph_module(gm, graph, copy.deepcopy(reference_items(gm, graph, {})))


def zeroed_reference(gm: fx.GraphModule, blocks: Sequence[Block]) -> fx.GraphModule:
    """Verify's reference: ``gm`` with each dropped branch multiplied by zero (``x + 0 · f(x)``),
    sharing ``gm``'s tensors."""
    graph = copy.deepcopy(gm.graph)
    nodes = {n.name: n for n in graph.nodes}
    for residual in (r for b in blocks for r in b.residuals):
        add, branch = nodes[residual.add], nodes[residual.branch]
        with graph.inserting_before(add):
            zero = graph.call_function(torch.mul, (branch, 0.0))
        add.replace_input_with(branch, zero)
    graph.lint()
    return build_graph_module(gm, graph, reference_items(gm, graph, {}))


def consecutive_runs(found: Blocks, dropped: Sequence[Block]) -> list[tuple[Block, ...]]:
    """The dropped blocks as maximal runs of neighbours in graph order (one stream shape per run)."""
    names = {b.name for b in dropped}
    runs: list[list[Block]] = []
    previous: Optional[Block] = None
    for block in found.blocks:
        if block.name in names:
            adjacent = runs and previous is not None and previous.name in names and previous.shape == block.shape
            runs[-1].append(block) if adjacent else runs.append([block])
        previous = block
    return [tuple(r) for r in runs]


__all__ = ["ADDS", "Residual", "Block", "Blocks", "find_blocks", "without_blocks", "skipping", "drop_blocks", "zeroed_reference",
           "consecutive_runs"]
