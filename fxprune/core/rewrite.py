"""Rewrite: an analysis and the set of dropped channel classes become a new, smaller GraphModule.

Collect, then rewrite: first every parameter's kept indices and every node's pruned shape are computed
from the channel maps; then a copy of the graph is made, each node whose sizes changed gets its rule's
rewriter (literal view sizes, split sizes, slice bounds, ``groups``), each module whose parameters
shrank is rebuilt with sliced copies and its size attributes fixed by its resizer, and every other module
and tensor is copied. The result shares no storage with the input, keeps the original parameter names,
dtypes, devices, ``requires_grad`` and training flags, and carries fresh traced values.
"""
from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Any, Optional, Union

import torch
import torch.fx as fx

from fxprune.core.channels import Dropped
from fxprune.core.analysis import Analysis
from fxprune.core.graph import carry_over, get_path, iter_arrays, meta_value
from fxprune.core.registry import lookup_resize, lookup_rewrite
from fxprune.core.predicates import is_tensor

KeptIndices = dict[str, dict[int, torch.Tensor]]
CALLS = ("call_function", "call_method", "call_module")


class Pruning:
    """Which positions survive: derived from the analysis and the dropped classes."""

    def __init__(self, analysis: Analysis, drop: Dropped):
        self.analysis, self.drop = analysis, drop
        self._keep: Optional[torch.Tensor] = None

    def kept(self, ids: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """Bool mask of kept positions (None for a dim without channels)."""
        if ids is None:
            return None
        if self._keep is None:  # per id, once: kept unless its class is dropped; a trailing True for -1
            self._keep = torch.cat([~self.drop[self.analysis.solution.root], torch.ones(1, dtype=torch.bool)])
        return self._keep[ids.clamp(min=-1)]  # -1 (a fixed position) reads the trailing True

    def param_kept(self) -> KeptIndices:
        """{state_dict key: {dim: kept indices}} for every parameter dim that loses positions."""
        out: KeptIndices = {}
        for key, dims in self.analysis.params.items():
            for dim, ids in enumerate(dims):
                mask = self.kept(ids)
                if mask is not None and not bool(mask.all()):
                    out.setdefault(key, {})[dim] = mask.nonzero().flatten()
        return out

    def new_shape(self, node: fx.Node) -> Any:
        return _shape(meta_value(node), self.analysis.env.get(node), self)


def _shape(value: Any, ids: Any, pruning: Pruning) -> Any:
    if isinstance(value, torch.Tensor):
        ids = ids if isinstance(ids, tuple) else (None,) * value.dim()
        return tuple(int(s) if i is None else int(pruning.kept(i).sum())
                     for s, i in zip(value.shape, ids))
    if isinstance(value, (list, tuple)):
        ids = ids if isinstance(ids, (list, tuple)) else [None] * len(value)
        return [_shape(v, i, pruning) for v, i in zip(value, ids)]
    return None


class RewriteCall:
    """What a rewriter sees: the new node to edit and the old node's shapes."""

    def __init__(self, pruning: Pruning, old: fx.Node, new: fx.Node):
        self.pruning, self.old_node, self.node = pruning, old, new

    def arg(self, index: int, name: str = "", default: Any = None) -> Any:
        if index < len(self.node.args):
            return self.node.args[index]
        return self.node.kwargs.get(name, default)

    def set_arg(self, index: int, name: str, value: Any) -> None:
        if index < len(self.node.args):
            args = list(self.node.args)
            args[index] = value
            self.node.args = tuple(args)
        else:
            self.node.kwargs = {**self.node.kwargs, name: value}

    def old_shape(self) -> Any:
        return _shape(meta_value(self.old_node), None, self.pruning)

    def new_shape(self) -> Any:
        return self.pruning.new_shape(self.old_node)

    def _input(self, index: int) -> fx.Node:
        return self.old_node.all_input_nodes[index] if index else self.old_node.args[0]

    def old_input_shape(self, index: int = 0) -> tuple:
        return tuple(meta_value(self._input(index)).shape)

    def new_input_shape(self, index: int = 0) -> tuple:
        return self.pruning.new_shape(self._input(index))

    def kept_positions(self, index: int, dim: int) -> Optional[torch.Tensor]:
        ids = self.pruning.analysis.env.get(self._input(index))
        return self.pruning.kept(ids[dim]) if isinstance(ids, tuple) and dim < len(ids) else None

    def is_tensor(self, node: Any) -> bool:
        return is_tensor(node)


def rewrite(analysis: Analysis, drop: Dropped) -> fx.GraphModule:
    """The pruned GraphModule: a new graph, new tensors; ``analysis.gm`` is left as it was."""
    pruning = Pruning(analysis, drop)
    kept = pruning.param_kept()
    for alias, name in analysis.aliases.items():  # tied weights: every name of the tensor is sliced alike
        if name in kept:
            kept[alias] = kept[name]
    old_gm = analysis.gm
    graph = copy.deepcopy(old_gm.graph)
    pairs = list(zip(old_gm.graph.nodes, graph.nodes))
    changed = _changed_nodes(pruning, pairs)
    for old, new in pairs:
        if old in changed and old.op in CALLS:  # raises if no op family owns a changed node
            rewriter = lookup_rewrite(old, _module(old_gm, old))
            if rewriter is not None:
                rewriter(RewriteCall(pruning, old, new))
    items = _new_attributes(old_gm, pairs, kept, pruning, changed)
    gm = build_graph_module(old_gm, graph, items)
    return gm


def _module(gm: fx.GraphModule, node: fx.Node) -> Optional[torch.nn.Module]:
    return gm.get_submodule(node.target) if node.op == "call_module" else None


def _changed_nodes(pruning: Pruning, pairs: list) -> set:
    """Nodes whose output or any input changes size; a number measured from a pruned dim
    (``C = x.shape[-1]``) changes too, so the views it sizes get their literal rewritten."""
    changed_values = set()
    for old, _ in pairs:
        if any(True for _ in iter_arrays(pruning.analysis.env.get(old))):
            if pruning.new_shape(old) != _shape(meta_value(old), None, pruning) or _stale_number(pruning, old):
                changed_values.add(old)
    return {old for old, _ in pairs
            if old in changed_values or any(i in changed_values for i in old.all_input_nodes)}


def _stale_number(pruning: Pruning, node: fx.Node) -> bool:
    """A number (or shape) that measures dropped positions: smaller at run time after pruning."""
    if isinstance(meta_value(node), torch.Tensor):
        return False
    return any(not bool(pruning.kept(ids).all()) for ids in iter_arrays(pruning.analysis.env.get(node)))


def _new_attributes(gm: fx.GraphModule, pairs: list, kept: KeptIndices, pruning: Pruning, changed: set) -> dict:
    """Every module and tensor the new graph refers to, rebuilt (sliced) or copied."""
    items: dict[str, Union[torch.nn.Module, torch.Tensor]] = {}
    memo: dict[int, Any] = {}  # one copy per original object: tied weights stay tied
    # a module with nothing to slice can still hold sizes (nn.Unflatten, a LayerNorm without affine)
    sized = {str(n.target) for n in changed
             if n.op == "call_module" and lookup_resize(gm.get_submodule(n.target)) is not None}
    owners = _owners(kept) | sized
    for old, _ in pairs:
        if old.op == "call_module" and old.target not in items:
            module = gm.get_submodule(old.target)
            items[old.target] = resize_module(module, str(old.target), kept, RewriteCall(pruning, old, old), memo,
                                              owners)
        elif old.op == "get_attr" and old.target not in items:
            value = get_path(gm, str(old.target))
            items[old.target] = _slice_tensor(value, kept.get(str(old.target), {}), memo) \
                if isinstance(value, torch.Tensor) else copy.deepcopy(value, memo)
    return items


def _slice_tensor(value: torch.Tensor, dims: dict[int, torch.Tensor], memo: dict) -> torch.Tensor:
    if id(value) not in memo:
        memo[id(value)] = _sliced(value, dims)
    return memo[id(value)]


def _sliced(value: torch.Tensor, dims: dict[int, torch.Tensor]) -> torch.Tensor:
    out = value.detach()
    for dim, index in sorted(dims.items()):
        out = out.index_select(dim, index.to(out.device))
    out = out.clone() if out.data_ptr() == value.data_ptr() or not dims else out.contiguous()
    if isinstance(value, torch.nn.Parameter):
        return torch.nn.Parameter(out, requires_grad=value.requires_grad)
    return out


def _owners(kept: KeptIndices) -> frozenset[str]:
    """Every key of ``kept`` and every module path above one: the modules that have something to slice."""
    out: set[str] = set()
    for key in kept:
        parts = key.split(".")
        out.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return frozenset(out)


def resize_module(module: torch.nn.Module, prefix: str, kept: KeptIndices, rw: RewriteCall, memo: dict,
                  owners: frozenset[str]):
    """A copy of ``module`` with every parameter and buffer sliced where the plan drops positions.

    ``owners`` (:func:`_owners` of ``kept``) is computed once by the caller; a lookup per module keeps
    rewriting linear in the number of modules (scanning ``kept`` per module was quadratic).
    """
    if prefix not in owners:
        return copy.deepcopy(module, memo)
    new = copy.copy(module)
    new.__dict__ = {k: (v.copy() if isinstance(v, (dict, OrderedDict)) else v)
                    for k, v in module.__dict__.items()}
    new._parameters = OrderedDict((n, None if p is None else _slice_tensor(p, kept.get(f"{prefix}.{n}", {}), memo))
                                  for n, p in module._parameters.items())
    new._buffers = OrderedDict((n, None if b is None else _slice_tensor(b, kept.get(f"{prefix}.{n}", {}), memo))
                               for n, b in module._buffers.items())
    new._modules = OrderedDict((n, None if c is None else resize_module(c, f"{prefix}.{n}", kept, rw, memo, owners))
                               for n, c in module._modules.items())
    resizer = lookup_resize(module)
    if resizer is None:
        raise AssertionError(f"module {prefix!r} ({type(module).__name__}) lost channels but has no resizer")
    resizer(module, new, rw)
    return new


def build_graph_module(old_gm: fx.GraphModule, graph: fx.Graph, items: dict) -> fx.GraphModule:
    """A GraphModule over ``graph`` whose attributes are exactly ``items``, nested by their paths."""
    root = torch.nn.Module()
    for target in sorted(items, key=lambda t: (not isinstance(items[t], torch.nn.Module), t.count("."), t)):
        _assign(root, target, items[target], old_gm)
    gm = carry_over(old_gm, fx.GraphModule(root, graph, class_name=type(old_gm).__name__))
    for module in gm.modules():
        if type(module) is torch.nn.Module:  # containers made here follow the root's mode
            module.training = old_gm.training
    return gm


def _assign(root: torch.nn.Module, target: str, value: Any, old_gm: fx.GraphModule) -> None:
    *path, name = target.split(".")
    owner = root
    for part in path:
        if not hasattr(owner, part):
            owner.add_module(part, torch.nn.Module())
        owner = getattr(owner, part)
    if isinstance(value, torch.nn.Parameter):
        owner.register_parameter(name, value)
    elif isinstance(value, torch.Tensor):
        owner.register_buffer(name, value, persistent=_persistent(old_gm, target))
    elif isinstance(value, torch.nn.Module):
        owner.add_module(name, value)
    else:
        setattr(owner, name, value)


def _persistent(gm: fx.GraphModule, target: str) -> bool:
    owner_path, _, name = target.rpartition(".")
    owner = gm.get_submodule(owner_path) if owner_path else gm
    return name not in getattr(owner, "_non_persistent_buffers_set", set())
