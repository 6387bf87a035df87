"""Rebuild: a deep copy of the user's model, its tensors sliced per a plan and its layers' sizes rebuilt.

The plan's ``kept_indices`` are keyed by the model's own ``state_dict`` names, so slicing needs no graph:
every parameter and buffer named in the plan is replaced by its kept slice (a ``Parameter`` stays a
``Parameter`` with its ``requires_grad``; tied tensors are sliced once and stay tied). Then every module
whose tensors shrank gets its size attributes rebuilt (``out_channels``, ``num_features``,
``normalized_shape``, ``num_heads``, ...): where the pruning's graph calls the module (the fx level),
by the very resizer :mod:`fxprune.core.rewrite` used on the graph; elsewhere (the export level) from the
sliced tensors' shapes. Modules that hold a size but no tensor (a LayerNorm without affine,
``nn.Unflatten``) are resized from the graph. A module of the user's own class that keeps a head count
(``self.num_heads``) has it scaled with its projections. Nothing else is touched: the user's Python
``forward`` runs unchanged, and :mod:`fxprune.module.check` says whether it computes what the graph does.

>>> pruned = fxprune.module.rebuild(model, result)     # doctest: +SKIP
>>> type(pruned) is type(model)                         # doctest: +SKIP
True
"""
from __future__ import annotations

import copy
from typing import Any, Callable, Optional

import torch
import torch.fx as fx
from torch import nn

from fxprune.core.graph import meta_value
from fxprune.core.registry import lookup_resize
from fxprune.core.rewrite import Pruning, RewriteCall
from fxprune.errors import PlanMismatchError

WIDTHS = ("hidden_dim", "hidden_size", "embed_dim", "d_model", "num_features", "head_hidden_size", "dim", "c",
          "hidden_channels", "mid_channels")
"""Attribute names a user's module keeps a channel width under (``x.reshape(n, self.hidden_dim, -1)``;
YOLO's C2f splits ``(self.c, self.c)`` in the forward its exporter uses)."""
SIZES = WIDTHS + ("num_heads", "num_attention_heads", "n_heads", "n_head", "heads", "head_dim", "head_size",
                  "attention_head_size", "all_head_size", "inner_dim", "key_dim", "qk_dim", "value_dim")
"""Attribute names a user's module keeps a size its forward computes with (head counts and widths)."""


def rebuild(model: nn.Module, result: Any) -> nn.Module:
    """A deep copy of ``model`` (its own class) with the tensors of ``result.plan`` sliced and the
    layers' size attributes rebuilt. ``model`` is not changed. No check is made: see
    :func:`fxprune.module.to_module`.

    >>> small = rebuild(model, fxprune.prune(model, (x,), sparsity=0.5))   # doctest: +SKIP
    """
    plan = getattr(result, "plan", result)  # a PruneResult, or a bare Plan (no graph: sizes from shapes)
    new = copy.deepcopy(model)
    changed = slice_tensors(new, plan)
    graph = _GraphSizes(result) if getattr(result, "analysis", None) is not None else None
    modules = dict(new.named_modules(remove_duplicate=False))
    old_modules = dict(model.named_modules(remove_duplicate=False))
    for path in sorted(changed | (graph.sized_paths() if graph else set()), key=lambda p: -p.count(".")):
        resize_attributes(path, old_modules[path], modules[path], graph)
    set_size_attributes(model, new, result, plan)
    return new


def slice_tensors(model: nn.Module, plan: Any) -> set[str]:
    """Slice every tensor of ``model`` the plan names, in place on this (copied) model; returns the paths
    of the modules that own a sliced tensor."""
    owners = _tensor_owners(model)
    missing = sorted(set(plan.kept_indices) - set(owners))
    if missing:
        raise PlanMismatchError(f"the plan names {missing[:3]} that {type(model).__name__} does not have "
                                f"({len(missing)} missing): a plan made for another model")
    sliced: dict[int, torch.Tensor] = {}  # one new tensor per old one: tied tensors stay tied
    for key, dims in plan.kept_indices.items():
        old = _get(owners[key], key)
        _check_shape(key, old, plan.shapes.get(key))
        sliced[id(old)] = _sliced(old, dims)
    paths = set()
    for key, module in owners.items():
        old = _get(module, key)
        if old is not None and id(old) in sliced:
            _set(module, key, sliced[id(old)])
            paths.add(key.rpartition(".")[0])
    return paths


def _tensor_owners(model: nn.Module) -> dict[str, nn.Module]:
    """{full tensor name: owning module} for every parameter and buffer under every name (tied ones too)."""
    out = {}
    for path, module in model.named_modules(remove_duplicate=False):
        for name in [*module._parameters, *module._buffers]:
            out[f"{path}.{name}" if path else name] = module
    return out


def _get(module: nn.Module, key: str) -> Optional[torch.Tensor]:
    name = key.rpartition(".")[2]
    return module._parameters.get(name, module._buffers.get(name))


def _set(module: nn.Module, key: str, value: torch.Tensor) -> None:
    name = key.rpartition(".")[2]
    table = module._parameters if name in module._parameters else module._buffers
    table[name] = value


def _check_shape(key: str, tensor: Optional[torch.Tensor], shape: Optional[tuple]) -> None:
    if tensor is None or (shape is not None and tuple(tensor.shape) != tuple(shape)):
        raise PlanMismatchError(f"{key!r} has shape {None if tensor is None else tuple(tensor.shape)}, the plan "
                                f"was made for {shape}: a plan made for another model")


def _sliced(value: torch.Tensor, dims: dict) -> torch.Tensor:
    out = value.detach()
    for dim, index in sorted(dims.items()):
        out = out.index_select(int(dim), torch.as_tensor(index, dtype=torch.long, device=out.device))
    out = out.contiguous().clone()
    return nn.Parameter(out, requires_grad=value.requires_grad) if isinstance(value, nn.Parameter) else out


class _GraphSizes:
    """The pruning's graph, where it calls modules (fx level): the resizers' view of each call."""

    def __init__(self, result: Any):
        analysis = result.analysis
        self.pruning = Pruning(analysis, result.drop)
        self.calls = {str(n.target): n for n in analysis.gm.graph.nodes if n.op == "call_module"}
        self.gm = analysis.gm

    def call(self, path: str) -> Optional[RewriteCall]:
        node = self.calls.get(path)
        return None if node is None else RewriteCall(self.pruning, node, node)

    def sized_paths(self) -> set[str]:
        """Called modules whose input or output shrinks: they may hold a size without holding a tensor."""
        out = set()
        for path, node in self.calls.items():
            if lookup_resize(self.gm.get_submodule(path)) is None:
                continue
            if any(self.pruning.new_shape(n) != _shape(n) for n in (node, *node.all_input_nodes)):
                out.add(path)
        return out


def _shape(node: fx.Node) -> Any:
    value = meta_value(node)
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


def resize_attributes(path: str, old: nn.Module, new: nn.Module, graph: Optional[_GraphSizes]) -> None:
    """Rebuild the size attributes of one module: by the graph's resizer where the graph calls it, else
    from its sliced tensors (:data:`SHAPE_RESIZERS`); a module of the user's own class is left as it is."""
    rw = graph.call(path) if graph else None
    resizer = lookup_resize(old)
    if rw is not None and resizer is not None:
        resizer(old, new, rw)
        return
    by_shape = _shape_resizer(old)
    if by_shape is not None:
        by_shape(old, new)


def _shape_resizer(module: nn.Module) -> Optional[Callable[[nn.Module, nn.Module], None]]:
    for cls in type(module).__mro__:
        if cls in SHAPE_RESIZERS:
            return SHAPE_RESIZERS[cls]
    return None


def _conv(old: nn.Module, new: nn.Module) -> None:
    from fxprune.core.rules.conv import resize_conv, resize_conv_transpose
    (resize_conv_transpose if old.transposed else resize_conv)(old, new, None)


def _norm_features(old: nn.Module, new: nn.Module) -> None:
    sized = new.weight if new.weight is not None else new.running_mean
    if sized is not None:
        new.num_features = sized.shape[0]


def _layer_norm(old: nn.Module, new: nn.Module) -> None:
    if new.weight is not None:
        new.normalized_shape = tuple(new.weight.shape)


def _group_norm(old: nn.Module, new: nn.Module) -> None:
    if new.weight is not None:
        new.num_channels = new.weight.shape[0]
        new.num_groups = old.num_groups * new.num_channels // old.num_channels if old.num_groups > 1 else 1


def _by_rule(name: str) -> Callable[[nn.Module, nn.Module], None]:
    """A resizer of the rule table that reads only the module's own tensors (no graph shapes)."""

    def resize(old: nn.Module, new: nn.Module) -> None:
        import importlib
        module, _, function = name.rpartition(".")
        getattr(importlib.import_module(f"fxprune.core.rules.{module}"), function)(old, new, None)

    return resize


SHAPE_RESIZERS: dict[type, Callable[[nn.Module, nn.Module], None]] = {
    nn.modules.conv._ConvNd: _conv,                                   # out/in_channels, groups
    nn.Linear: _by_rule("linear.resize_linear"),                       # out/in_features
    nn.modules.batchnorm._NormBase: _norm_features,                   # BatchNorm*, InstanceNorm*
    nn.LayerNorm: _layer_norm,
    nn.RMSNorm: _layer_norm,
    nn.GroupNorm: _group_norm,
    nn.Embedding: _by_rule("embedding.resize_embedding"),
    nn.EmbeddingBag: _by_rule("embedding.resize_embedding"),
    nn.PReLU: _by_rule("norm.resize_prelu"),
    nn.MultiheadAttention: _by_rule("attention.resize_multihead_attention"),  # whole heads
    nn.RNNBase: _by_rule("recurrent.resize_recurrent"),               # input/hidden size, flat weights
}
"""Size attributes rebuilt from a module's sliced tensors, for results without module calls (export)."""


def set_size_attributes(old_model: nn.Module, new_model: nn.Module, result: Any, plan: Any) -> None:
    """A user's module (not a ``torch.nn`` layer) keeps sizes its forward reads (``self.num_heads``,
    ``self.hidden_dim``). Each is set to the literal the rewrite put where the graph had its value, in the
    nodes the module's own forward made (``reshape(b, n, 3, 4, 6)`` was ``(b, n, 3, 4, 12)``:
    ``head_dim`` 12 -> 6); without such a literal, a width attribute takes the one new width the plan
    gives tensors of its size under the module. The check confirms every guess: a wrong one fails
    there and is never returned."""
    literals = changed_literals(result)
    new_modules = dict(new_model.named_modules(remove_duplicate=False))
    for path, old in old_model.named_modules(remove_duplicate=False):
        if type(old).__module__.startswith("torch.nn"):
            continue
        widths = _widths(plan, f"{path}." if path else "")
        for name in SIZES:
            value = getattr(old, name, None)
            if not isinstance(value, int) or isinstance(value, bool):
                continue
            found = literals.get(path, {}).get(value) or (widths.get(value) if name in WIDTHS else None)
            if found is not None and len(found) == 1:
                setattr(new_modules[path], name, next(iter(found)))


def changed_literals(result: Any) -> dict[str, dict[int, set[int]]]:
    """{module path: {old literal: {new literals}}} over the graph nodes each module's forward made,
    pairing the analysed graph with the rewritten one node by node."""
    analysis = getattr(result, "analysis", None)
    if analysis is None or getattr(result, "graph_module", None) is None:
        return {}
    old_nodes, new_nodes = list(analysis.gm.graph.nodes), list(result.graph_module.graph.nodes)
    if len(old_nodes) != len(new_nodes):  # a pass reshaped the graph: no pairing
        return {}
    out: dict[str, dict[int, set[int]]] = {}
    for old, new in zip(old_nodes, new_nodes):
        for a, b in zip(_ints((old.args, old.kwargs)), _ints((new.args, new.kwargs))):
            if a is not None and b is not None and a != b:
                out.setdefault(_owner(old), {}).setdefault(a, set()).add(b)
    return out


def _ints(value: Any) -> list:
    """Every int literal in a node's arguments, in order (bools and nodes as placeholders)."""
    if isinstance(value, dict):
        return [i for v in value.values() for i in _ints(v)]
    if isinstance(value, (list, tuple)):
        return [i for v in value for i in _ints(v)]
    return [value if isinstance(value, int) and not isinstance(value, bool) else None]


def _owner(node: fx.Node) -> str:
    """The path of the innermost module whose forward made ``node`` ("" for the root)."""
    stack = node.meta.get("nn_module_stack") or {}
    path = list(stack.values())[-1][0] if stack else ""
    return path.replace("L['self'].", "").replace("L__self___", "") if isinstance(path, str) else ""


def _widths(plan: Any, prefix: str) -> dict[int, set[int]]:
    """{old size: {new sizes}} over the plan's tensors under ``prefix``."""
    out: dict[int, set[int]] = {}
    for key, dims in plan.kept_indices.items():
        if key.startswith(prefix):
            for dim, kept in dims.items():
                out.setdefault(plan.shapes[key][int(dim)], set()).add(len(kept))
    return out
