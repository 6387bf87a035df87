"""Graph utilities every stage shares: reading traced values, walking attribute paths, copying a
GraphModule with everything it carries besides its graph.

A leaf module (it imports nothing from fxprune), so rules, rewrite, verify and the passes can all use it.

>>> gm = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.Linear(2, 2)))   # doctest: +SKIP
>>> get_path(gm, "0.weight").shape                                              # doctest: +SKIP
torch.Size([2, 2])
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch
import torch.fx as fx

CARRIED = ("_in_spec", "_out_spec")
"""Attributes of an export-level module that its forward's pytree handling reads."""


def meta_value(node: fx.Node) -> Any:
    """The traced value of a node: a (fake) tensor, ShapeProp's metadata, or a number."""
    if "val" in node.meta:
        return node.meta["val"]
    if "tensor_meta" in node.meta:
        return node.meta["tensor_meta"]
    if "example_value" in node.meta:
        return node.meta["example_value"]
    raise KeyError(f"node {node.name!r} has no traced value; was the graph captured by fxprune.capture?")


def has_value(node: fx.Node) -> bool:
    return any(k in node.meta for k in ("val", "tensor_meta", "example_value"))


def fixed_like(value: Any) -> Any:
    """A channel map with no channel on any dim, shaped like ``value`` (nested for tuples)."""
    if isinstance(value, torch.Tensor) or hasattr(value, "shape") and hasattr(value, "dtype"):
        return (None,) * len(value.shape)
    if isinstance(value, (list, tuple)):
        return tuple(fixed_like(v) for v in value)
    return None


def iter_arrays(ids: Any) -> Iterator[torch.Tensor]:
    """Every id array inside a (nested) channel map."""
    if isinstance(ids, torch.Tensor):
        yield ids
    elif isinstance(ids, (list, tuple)):
        for item in ids:
            yield from iter_arrays(item)
    elif isinstance(ids, dict):
        for item in ids.values():
            yield from iter_arrays(item)


def describe_target(node: fx.Node) -> str:
    """A node's target as a user reads it: ``module conv1``, ``method .view()``, ``torch.cat``."""
    target = node.target
    if node.op == "call_module":
        return f"module {target}"
    if node.op == "call_method":
        return f"method .{target}()"
    name = getattr(target, "__name__", None) or str(target)
    module = getattr(target, "__module__", "") or ""
    if isinstance(target, torch._ops.OpOverload):
        return str(target)
    return f"{module}.{name}" if module and module not in ("_operator", "builtins") else name


def get_path(root: Any, path: str) -> Any:
    """``root.a.b.c`` for ``path == "a.b.c"`` (raises AttributeError naming the missing part)."""
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def tensor_at(gm: torch.nn.Module, key: str, missing_ok: bool = False) -> Optional[torch.Tensor]:
    """The parameter or buffer at ``key`` (None if absent and ``missing_ok``)."""
    owner, _, name = key.rpartition(".")
    try:
        module = gm.get_submodule(owner) if owner else gm
    except AttributeError:
        if missing_ok:
            return None
        raise
    value = getattr(module, name, None)
    if isinstance(value, torch.Tensor):
        return value
    if missing_ok:
        return None
    raise AttributeError(f"no tensor {key!r} in the graph module")


def carry_over(old: fx.GraphModule, new: fx.GraphModule) -> fx.GraphModule:
    """Give ``new`` what ``old`` carries besides graph and attributes: export's pytree specs, the
    training flag and ``gm.meta`` (a prepared graph's quantization state, which convert reads)."""
    for attr in CARRIED:
        if hasattr(old, attr):
            setattr(new, attr, getattr(old, attr))
    new.training = old.training
    new.meta = dict(getattr(old, "meta", {}))
    return new


def copy_graph_module(gm: fx.GraphModule, graph: Optional[fx.Graph] = None) -> fx.GraphModule:
    """A GraphModule over ``graph`` (default: a copy of ``gm``'s, so its metadata may be rewritten)
    sharing ``gm``'s modules and tensors, with everything :func:`carry_over` carries."""
    graph = copy.deepcopy(gm.graph) if graph is None else graph
    return carry_over(gm, fx.GraphModule(gm, graph, class_name=type(gm).__name__))


# --- masks: ``mul(x, get_attr(fxprune_mask_<i>))`` --------------------------------------------------
MASK_PREFIX = "fxprune_mask_"
MUL_TARGETS = (torch.mul, torch.ops.aten.mul.Tensor)


@dataclass(frozen=True)
class MaskSite:
    """One mask: ``keep`` along ``dim`` of input ``arg`` of ``node`` (``arg=None``: the node's own
    value, a weight read by ``get_attr``)."""

    node: str
    arg: Optional[int]
    dim: int
    keep: torch.Tensor


def insert_masks(gm: fx.GraphModule, sites: list[MaskSite], level: str) -> fx.GraphModule:
    """Add one buffer and one ``mul`` per site to ``gm`` (edited in place: pass a fresh copy)."""
    mul = torch.ops.aten.mul.Tensor if level == "export" else torch.mul
    nodes = {n.name: n for n in gm.graph.nodes}
    for index, site in enumerate(sites):
        node, name = nodes[site.node], f"{MASK_PREFIX}{index}"
        value = node if site.arg is None else node.args[site.arg]
        like = meta_value(value)
        shape = [1] * like.dim()
        shape[site.dim] = -1
        gm.register_buffer(name, site.keep.view(shape).to(dtype=like.dtype, device=like.device))
        anchor = gm.graph.inserting_after(node) if site.arg is None else gm.graph.inserting_before(node)
        with anchor:
            mask = gm.graph.get_attr(name)
        with gm.graph.inserting_after(mask):
            masked = gm.graph.call_function(mul, (value, mask))
        if site.arg is None:
            node.replace_all_uses_with(masked, delete_user_cb=lambda user: user is not masked)
        else:
            node.args = node.args[:site.arg] + (masked,) + node.args[site.arg + 1:]
    gm.recompile()
    return gm


def is_mask(node: fx.Node) -> bool:
    """``mul(x, get_attr(fxprune_mask_<i>))``, as :func:`insert_masks` writes it."""
    return (node.op == "call_function" and node.target in MUL_TARGETS and len(node.args) == 2
            and isinstance(node.args[1], fx.Node) and node.args[1].op == "get_attr"
            and str(node.args[1].target).startswith(MASK_PREFIX))


def attribute(gm: torch.nn.Module, target: str) -> Any:
    """The object at a dotted attribute path of ``gm``, or None where any part is missing."""
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part, None)
    return obj


def free_attribute(gm: fx.GraphModule, owner: str, taken: set) -> str:
    """A new attribute path next to ``owner`` for a bias a pass creates (added to ``taken``)."""
    for name in ("bias", "folded_bias", *(f"folded_bias_{i}" for i in range(1, 1000))):
        target = f"{owner}.{name}" if owner else name
        if target not in taken and attribute(gm, target) is None:
            taken.add(target)
            return target
    raise AssertionError(f"no free attribute name next to {owner!r}")


def set_aten_bias(graph: fx.Graph, producer: fx.Node, target: str) -> None:
    """Make an ATen conv/linear node read its bias from the ``get_attr`` ``target``: every one of them
    (``conv*d``, ``conv_transpose*d``, ``convolution``, ``linear``) takes the bias as its third argument."""
    with graph.inserting_after(producer.args[1]):  # beside the weight's get_attr
        bias = graph.get_attr(target)
    args = list(producer.args) + [None] * max(0, 3 - len(producer.args))
    args[2] = bias
    producer.args = tuple(args)
    producer.kwargs = {k: v for k, v in producer.kwargs.items() if k != "bias"}
