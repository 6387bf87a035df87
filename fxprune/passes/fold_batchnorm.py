"""``fold-batchnorm``: fold an eval-mode BatchNorm into the conv or linear layer that feeds it.

In eval mode a BatchNorm is an affine map per channel, so it folds into the producer's output rows::

    bn(conv(x)) = gamma * (W*x + b - mean) / sqrt(var + eps) + beta = W'*x + b'
    s = gamma / sqrt(var + eps),   W' = W * s (per output channel),   b' = (b - mean) * s + beta

Two spellings are matched, one per graph level:

- **fx**: ``call_module`` ``Conv{1,2,3}d`` / ``ConvTranspose{1,2,3}d`` (any groups) / ``Linear`` followed
  by ``call_module`` ``BatchNorm{1,2,3}d`` (exact types: QAT and fused modules are left alone);
- **export**: ``aten.conv{1,2,3}d`` / ``aten.conv_transpose{1,2,3}d`` / ``aten.convolution`` /
  ``aten.linear`` with ``get_attr`` parameters, followed by ``aten.batch_norm`` (``training=False``) or
  ``aten._native_batch_norm_legit_no_training`` and its ``getitem(·, 0)`` (a linear decomposed to
  ``addmm`` is not matched).

A fold is made only where it is exact, and skipped otherwise (never guessed):

- the BatchNorm normalises with its **running statistics**: eval mode and ``track_running_stats``.
  **A training-mode BatchNorm is left alone** — it normalises with batch statistics, which no weight
  can hold;
- the producer's output has the BatchNorm as its only user (any other user would see folded values),
  and the producer's parameters are used by no other node (a shared conv or weight);
- the normalised dim is the producer's output-channel dim: a batched conv (output rank = weight rank),
  a linear with a 2-d output (``BatchNorm1d`` on ``[N, L, F]`` normalises ``L``, not the features).

Collect, then rewrite: every fold is found on the input graph first; then a copy of the graph is edited
and a new GraphModule is built with new tensors (the folded ones computed in float64 and cast back to
their dtype, every other one copied). The BatchNorm node, its ``getitem`` and its now unused parameter
nodes are removed; the producer's users read the producer directly.
"""
from __future__ import annotations

import copy
import operator
from collections import Counter
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.fx as fx
import torch.nn as nn

from fxprune.core.capture import graph_level
from fxprune.core.graph import attribute, free_attribute, set_aten_bias
from fxprune.passes.pipeline import Pass, refresh_values, register
from fxprune.core.rewrite import build_graph_module

aten = torch.ops.aten

CONV_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
TRANSPOSED_MODULES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
NORM_MODULES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
# packet -> (bias position, groups position, transposed: bool or the position of the flag)
PRODUCER_ATEN: dict[Any, tuple[int, Optional[int], Any]] = {
    **{op: (2, 6, False) for op in (aten.conv1d, aten.conv2d, aten.conv3d)},
    **{op: (2, 6, True) for op in (aten.conv_transpose1d, aten.conv_transpose2d, aten.conv_transpose3d)},
    aten.convolution: (2, 8, 6),
    aten.linear: (2, None, False),
}
# overload -> (position of the training flag, position of eps)
EXPORT_NORMS: dict[Any, tuple[Optional[int], int]] = {
    aten.batch_norm.default: (5, 7),
    aten._native_batch_norm_legit_no_training.default: (None, 6),
}


@dataclass(frozen=True)
class Stats:
    """A BatchNorm's eval-mode affine map (``weight``/``bias`` None when not affine)."""

    mean: torch.Tensor
    var: torch.Tensor
    eps: float
    weight: Optional[torch.Tensor]
    bias: Optional[torch.Tensor]


@dataclass(frozen=True)
class Fold:
    """One match: ``norm`` (read through ``results``) folds into ``producer``'s parameters."""

    producer: str
    """The conv / linear node."""
    norm: str
    """The BatchNorm node."""
    results: tuple[str, ...]
    """The nodes whose users switch to the producer: the BatchNorm, or its ``getitem(·, 0)`` nodes."""
    weight: str
    """The producer's weight, as a state_dict key."""
    bias: Optional[str]
    """The producer's bias (None: the fold adds one)."""
    transposed: bool
    groups: int
    stats: Stats


# --- the arithmetic -----------------------------------------------------------------------------
def output_scale(scale: torch.Tensor, shape: tuple, transposed: bool, groups: int) -> torch.Tensor:
    """The scale of each weight element's output channel, broadcastable to the weight's ``shape``."""
    rest = [1] * (len(shape) - 2)
    if not transposed:  # weight[out, in/g, *k]
        return scale.view(-1, 1, *rest)
    cin, per_group = shape[0], shape[1]  # weight[in, out/g, *k]: input i feeds outputs of its group
    grid = scale.view(groups, 1, per_group).expand(groups, cin // groups, per_group)
    return grid.reshape(cin, per_group, *rest)


def fold_weights(weight: torch.Tensor, bias: Optional[torch.Tensor], stats: Stats, transposed: bool,
                 groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W', b')``: the producer's parameters with the BatchNorm folded in (new tensors)."""
    mean, var = stats.mean.detach().double(), stats.var.detach().double()
    gamma = stats.weight.detach().double() if stats.weight is not None else torch.ones_like(mean)
    beta = stats.bias.detach().double() if stats.bias is not None else torch.zeros_like(mean)
    scale = gamma * torch.rsqrt(var + stats.eps)
    w = weight.detach().double() * output_scale(scale, tuple(weight.shape), transposed, groups)
    b = bias.detach().double() if bias is not None else torch.zeros_like(mean)
    new_bias = (b - mean) * scale + beta
    return w.to(weight.dtype), new_bias.to(bias.dtype if bias is not None else weight.dtype)


def _like(value: torch.Tensor, data: torch.Tensor) -> torch.Tensor:
    """``data`` as a Parameter when ``value`` is one (same ``requires_grad``), else as a tensor."""
    if isinstance(value, nn.Parameter):
        return nn.Parameter(data, requires_grad=value.requires_grad)
    return data


# --- matching ---------------------------------------------------------------------------------------
def _out_rank_ok(producer: fx.Node, weight_rank: int, linear: bool) -> bool:
    """The BatchNorm normalises dim 1: it must be the producer's output-channel dim."""
    value = producer.meta.get("val")
    if not isinstance(value, torch.Tensor):
        return False
    return value.dim() == (2 if linear else weight_rank)


def _single_producer_input(norm: fx.Node) -> Optional[fx.Node]:
    x = norm.args[0] if norm.args else None
    if isinstance(x, fx.Node) and len(x.users) == 1:
        return x
    return None


def _find_fx(gm: fx.GraphModule) -> list[Fold]:
    calls = Counter(n.target for n in gm.graph.find_nodes(op="call_module"))
    attrs = [str(n.target) for n in gm.graph.find_nodes(op="get_attr")]
    folds = (_match_fx(gm, norm, calls, attrs) for norm in gm.graph.find_nodes(op="call_module"))
    return [f for f in folds if f is not None]


def _match_fx(gm: fx.GraphModule, norm: fx.Node, calls: Counter, attrs: list) -> Optional[Fold]:
    bn = gm.get_submodule(norm.target)
    if type(bn) not in NORM_MODULES or bn.training or bn.running_mean is None or len(norm.args) != 1:
        return None
    producer = _single_producer_input(norm)
    if producer is None or producer.op != "call_module" or calls[producer.target] != 1:
        return None
    module = gm.get_submodule(producer.target)
    kind = type(module)
    prefix = f"{producer.target}."
    if kind not in (*CONV_MODULES, *TRANSPOSED_MODULES, nn.Linear) or any(a.startswith(prefix) for a in attrs):
        return None
    if not _out_rank_ok(producer, module.weight.dim(), kind is nn.Linear):
        return None
    stats = Stats(bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias)
    bias = f"{prefix}bias" if module.bias is not None else None
    return Fold(producer.name, norm.name, (norm.name,), f"{prefix}weight", bias,
                kind in TRANSPOSED_MODULES, getattr(module, "groups", 1), stats)


def _norm_results(norm: fx.Node) -> Optional[tuple[fx.Node, ...]]:
    """The node(s) carrying the normalised tensor; None for a training-mode norm, or if the
    statistics outputs are read."""
    training_at, eps_at = EXPORT_NORMS[norm.target]
    if len(norm.args) <= eps_at or (training_at is not None and norm.args[training_at] is not False):
        return None
    if norm.target == aten.batch_norm.default:
        return (norm,)
    users = tuple(norm.users)
    return users if all(u.target is operator.getitem and u.args[1] == 0 for u in users) else None


def _norm_stats(gm: fx.GraphModule, norm: fx.Node) -> Optional[Stats]:
    """``(input, weight, bias, running_mean, running_var, ...)`` read from get_attr tensors."""
    tensors = []
    for arg in norm.args[1:5]:
        if arg is not None and not (isinstance(arg, fx.Node) and arg.op == "get_attr"):
            return None
        tensors.append(None if arg is None else attribute(gm, str(arg.target)))
    weight, bias, mean, var = tensors
    if mean is None or var is None:
        return None
    return Stats(mean, var, float(norm.args[EXPORT_NORMS[norm.target][1]]), weight, bias)


def _own_attr(arg: Any, attrs: Counter) -> Optional[str]:
    """The target of a get_attr node read by one node only (None if not such a node)."""
    if isinstance(arg, fx.Node) and arg.op == "get_attr" and len(arg.users) == 1 and attrs[arg.target] == 1:
        return str(arg.target)
    return None


def _find_export(gm: fx.GraphModule) -> list[Fold]:
    attrs = Counter(n.target for n in gm.graph.find_nodes(op="get_attr"))
    folds = (_match_export(gm, norm, attrs) for norm in gm.graph.nodes
             if isinstance(norm.target, torch._ops.OpOverload) and norm.target in EXPORT_NORMS)
    return [f for f in folds if f is not None]


def _match_export(gm: fx.GraphModule, norm: fx.Node, attrs: Counter) -> Optional[Fold]:
    results = _norm_results(norm)
    producer = _single_producer_input(norm) if results else None
    packet = getattr(producer.target, "overloadpacket", None) if producer is not None else None
    if producer is None or producer.op != "call_function" or packet not in PRODUCER_ATEN:
        return None
    bias_at, groups_at, transposed = PRODUCER_ATEN[packet]
    args = producer.args
    weight = _own_attr(args[1], attrs)
    bias_arg = args[bias_at] if len(args) > bias_at else producer.kwargs.get("bias")
    bias = _own_attr(bias_arg, attrs)
    stats = _norm_stats(gm, norm)
    if weight is None or (bias_arg is not None and bias is None) or stats is None:
        return None
    if not isinstance(transposed, bool):  # aten.convolution: the flag is an argument
        transposed = bool(args[transposed])
    groups = int(args[groups_at]) if groups_at is not None and len(args) > groups_at else 1
    if not _out_rank_ok(producer, attribute(gm, weight).dim(), packet is aten.linear):
        return None
    return Fold(producer.name, norm.name, tuple(r.name for r in results), weight, bias, transposed,
                groups, stats)


# --- rewriting ----------------------------------------------------------------------------------------
def _folded_module(module: nn.Module, weight: torch.Tensor, bias: torch.Tensor) -> nn.Module:
    new = copy.deepcopy(module)
    new.weight = _like(module.weight, weight)
    new.bias = _like(module.weight if module.bias is None else module.bias, bias)
    return new


def _rewire(graph: fx.Graph, nodes: dict[str, fx.Node], fold: Fold) -> list[fx.Node]:
    """Users of the BatchNorm read the producer; the BatchNorm nodes go. Returns its get_attr inputs."""
    producer, norm = nodes[fold.producer], nodes[fold.norm]
    inputs = [n for n in norm.all_input_nodes if n.op == "get_attr"]
    for name in fold.results:
        nodes[name].replace_all_uses_with(producer)
        if nodes[name] is not norm:
            graph.erase_node(nodes[name])
    graph.erase_node(norm)
    return inputs


def _erase_unused_attrs(graph: fx.Graph, norm_inputs: list[fx.Node]) -> None:
    """The folded BatchNorms' parameter nodes, and their modules' other unused ones
    (``num_batches_tracked``)."""
    owners = {str(n.target).rpartition(".")[0] for n in norm_inputs if "." in str(n.target)}
    for node in list(graph.find_nodes(op="get_attr")):
        if not node.users and (node in norm_inputs or str(node.target).rpartition(".")[0] in owners):
            graph.erase_node(node)


def fold(gm: fx.GraphModule, folds: list[Fold], level: str) -> fx.GraphModule:
    """A new GraphModule with every fold applied; ``gm`` is left as it was."""
    graph = copy.deepcopy(gm.graph)
    nodes = {old.name: new for old, new in zip(gm.graph.nodes, graph.nodes)}
    tensors, modules, taken = {}, {}, set()
    norm_inputs: list[fx.Node] = []
    for f in folds:
        weight = attribute(gm, f.weight)
        w, b = fold_weights(weight, attribute(gm, f.bias) if f.bias else None, f.stats, f.transposed, f.groups)
        if level == "fx":
            owner = f.weight.rpartition(".")[0]
            modules[owner] = _folded_module(gm.get_submodule(owner), w, b)
        else:
            bias_target = f.bias or free_attribute(gm, f.weight.rpartition(".")[0], taken)
            tensors[f.weight], tensors[bias_target] = _like(weight, w), _like(weight, b)
            if f.bias is None:
                set_aten_bias(graph, nodes[f.producer], bias_target)
        norm_inputs += _rewire(graph, nodes, f)
    _erase_unused_attrs(graph, norm_inputs)
    return build_graph_module(gm, graph, _items(gm, graph, modules, tensors))


def _items(gm: fx.GraphModule, graph: fx.Graph, modules: dict, tensors: dict) -> dict:
    """Every attribute the new graph reads: the folded ones, and copies of all others."""
    items: dict[str, Any] = {}
    for node in graph.nodes:
        target = str(node.target)
        if node.op == "call_module" and target not in items:
            items[target] = modules[target] if target in modules else copy.deepcopy(gm.get_submodule(target))
        elif node.op == "get_attr" and target not in items:
            items[target] = tensors[target] if target in tensors else copy.deepcopy(attribute(gm, target))
    return items


@register
@dataclass(frozen=True)
class FoldBatchNorm(Pass):
    """Fold every eval-mode BatchNorm into the conv / linear before it (training-mode ones stay)."""

    name = "fold-batchnorm"

    def apply(self, gm: fx.GraphModule) -> fx.GraphModule:
        level = graph_level(gm)
        folds = _find_fx(gm) if level == "fx" else _find_export(gm)
        return refresh_values(fold(gm, folds, level))
