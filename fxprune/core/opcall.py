"""The op-call API the rules use: what a rule sees of one node (:class:`OpCall`) and the facts it
records (producers, contractions, weighted consumers, norm statistics) on the walk's :class:`Context`;
and :func:`weight_source`, the ``get_attr`` a weight argument is read from (through quantizers).

A leaf of the package's import graph below :mod:`fxprune.analysis`: rules import this module, the
walk in :mod:`fxprune.analysis` drives it, and neither rules nor this module import the walk.

A rule reads its node through :class:`OpCall` and records facts with it::

    def relu_like(op: OpCall):
        # f(x) -> f(x): channels pass through
        return op.ids(op.arg(0, "input"))

    def layer_norm(op: OpCall):
        x = op.arg(0, "input")
        op.approximate(op.ids(x)[-1])   # statistics over the kept channels
        return op.ids(x)
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.fx as fx

from fxprune.core.channels import ChannelTable, TensorIds
from fxprune.core.lockstep import Pieces
from fxprune.core.graph import describe_target, fixed_like, iter_arrays, meta_value, tensor_at
from fxprune.core.predicates import is_quantizer

class Unsupported(Exception):
    """Raised by a rule for a variant it does not handle; the node then freezes its channels."""


@dataclass(frozen=True)
class AnalysisOptions:
    """Choices that change which channels are tied together."""

    prune_outputs: bool = False
    """When False, channels that reach a graph output are kept (the output is a fixed interface)."""
    split_axis: str = "largest"
    """Which axis carries the channels when a view splits a channel dim in two (``"largest"`` prunes
    head dims and shuffle-group widths; ``"outer"`` prunes whole heads)."""
    code_sizes: bool = False
    """When True, a view whose size is measured from another tensor's channel dim at run time
    (``v.view(B, C, H, W)`` with ``B, C, H, W = x.shape``) keeps the two dims' kept counts equal, so
    code that recomputes the size (the user's own forward, under :mod:`fxprune.module`) stays valid.
    The graph needs no such tie: its rewrite puts the pruned literal there."""


@dataclass(frozen=True)
class Producer:
    """A parameter dim whose slices create channels (a conv's output rows): the scores' source."""

    key: str
    dim: int
    node: str


@dataclass(frozen=True)
class ActSink:
    """An activation consumed by a contraction (matmul, sum): verify masks its dropped positions."""

    node: str
    arg: int
    dim: int
    ids: torch.Tensor


@dataclass(frozen=True)
class NormSite:
    """A statistic over channels (LayerNorm, RMSNorm, GroupNorm, a mean or variance): verify's reference
    recomputes it over the kept positions only, as ``kept_only(x, keep, *args)`` (``keep``: 1 at kept
    positions, shaped to broadcast against ``x``)."""

    node: str
    dims: tuple[int, ...]
    """The dims of ``x`` the statistic runs over that carry channels."""
    ids: tuple[torch.Tensor, ...]
    """Their channel ids, one array per dim of ``dims``."""
    kept_only: Callable
    args: tuple
    """``x`` then what ``kept_only`` takes after ``keep``: nodes, literals, or a ``str`` naming a parameter."""


@dataclass(frozen=True)
class WeightedConsumer:
    """A conv/linear that reads channels through the input columns of its weight: its bias can absorb
    dropped inputs' constant part (``propagate_bias``), calibration watches its input (``wanda``,
    ``flap``) and recovery refits it (``reconstruct``, ``compensate-bias``)."""

    node: str
    weight: str
    """The weight's parameter name."""
    in_dim: int
    """The weight dim that runs over the input channels."""
    bias: Optional[str]
    input: str
    """The node whose output the layer reads."""
    channel_dim: int
    """The channel dim of that input."""
    exact: bool
    """False for a padded conv: the constant does not reach the zero-padded border."""


@dataclass
class Context:
    """Mutable state of one analysis walk; rules talk to it through :class:`OpCall`."""

    gm: fx.GraphModule
    options: AnalysisOptions
    table: ChannelTable = field(default_factory=ChannelTable)
    env: dict[fx.Node, Any] = field(default_factory=dict)
    params: dict[str, TensorIds] = field(default_factory=dict)
    producers: list[Producer] = field(default_factory=list)
    param_sinks: list[tuple[str, int]] = field(default_factory=list)
    act_sinks: list[ActSink] = field(default_factory=list)
    weighted_consumers: list[WeightedConsumer] = field(default_factory=list)
    norm_sites: list[NormSite] = field(default_factory=list)
    pieces: list[Pieces] = field(default_factory=list)
    """Splits whose pieces must keep equal sizes (``chunk``): see :mod:`fxprune.core.lockstep`."""
    aliases: dict[str, str] = field(default_factory=dict)
    """Every parameter name seen -> its canonical name (see :meth:`canonical`)."""
    _names: dict[int, str] = field(default_factory=dict)

    def param(self, key: str) -> TensorIds:
        """The channel map of a parameter or buffer, one fresh id per position the first time."""
        key = self.canonical(key)
        if key not in self.params:
            shape = tensor_at(self.gm, key).shape
            self.params[key] = tuple(self.table.fresh(n) for n in shape)
        return self.params[key]

    def canonical(self, key: str) -> str:
        """The first name under which a tensor was seen: tied weights (an embedding shared with the
        output layer) are one tensor to analysis, plan and rewrite."""
        if key not in self.aliases:
            tensor = tensor_at(self.gm, key)
            self.aliases[key] = self._names.setdefault(id(tensor), key)
        return self.aliases[key]


class OpCall:
    """What a rule sees of one node: its args' channel maps, shapes and literals."""

    def __init__(self, ctx: Context, node: fx.Node, module: Optional[torch.nn.Module]):
        self.ctx, self.node, self.module = ctx, node, module
        self.table = ctx.table

    # --- reading the node -------------------------------------------------------------------
    def arg(self, index: int, name: str = "", default: Any = None) -> Any:
        """The raw argument by position or keyword (a Node, a literal, a list...)."""
        if index < len(self.node.args):
            return self.node.args[index]
        return self.node.kwargs.get(name, default)

    def ids(self, value: Any) -> Any:
        """The channel map of an argument (None for literals)."""
        if isinstance(value, fx.Node):
            return self.ctx.env.get(value)
        if isinstance(value, (list, tuple)):
            return type(value)(self.ids(v) for v in value)
        if isinstance(value, dict):  # e.g. a graph output {"out": ..., "aux": ...}
            return {k: self.ids(v) for k, v in value.items()}
        return None

    def shape(self, value: Any) -> tuple[int, ...]:
        val = meta_value(value) if isinstance(value, fx.Node) else value
        return tuple(int(s) for s in val.shape)

    def value(self, value: Any) -> Any:
        """A literal, or the traced value of a node (ints from ``size()``)."""
        return meta_value(value) if isinstance(value, fx.Node) else value

    @property
    def out(self) -> Any:
        return meta_value(self.node)

    @property
    def name(self) -> str:
        return self.node.name

    def where(self) -> str:
        return f"node {self.node.name!r} ({describe_target(self.node)})"

    # --- recording facts --------------------------------------------------------------------
    def unify(self, a: Optional[torch.Tensor], b: Optional[torch.Tensor], why: str = "") -> None:
        """Tie two per-position id arrays; a None (fixed) side freezes the other."""
        reason = why or f"meets a fixed dim at {self.where()}"
        if a is None and b is None:
            return
        if a is None or b is None:
            self.table.freeze(a if b is None else b, reason)
            return
        self.table.unify(a, b, reason)

    def freeze(self, ids: Any, why: str) -> None:
        for array in iter_arrays(ids):
            self.table.freeze(array, f"{why} at {self.where()}")

    def approximate(self, ids: Optional[torch.Tensor]) -> None:
        self.table.approximate(ids)

    def param(self, key: str) -> TensorIds:
        return self.ctx.param(key)

    def param_key(self, value: Any) -> Optional[str]:
        """The state_dict key behind an argument that is a parameter: a get_attr, seen through the
        fake-quantizers and folded-BatchNorm scalings QAT puts on weights (``rules.quantization``)."""
        value = weight_source(value, self.ctx.gm)
        if isinstance(value, fx.Node) and value.op == "get_attr":
            return str(value.target)
        return None

    def produce(self, key: str, dim: int) -> torch.Tensor:
        """Declare that this param dim creates channels; returns their ids."""
        ids = self.ctx.param(key)[dim]
        self.ctx.producers.append(Producer(self.ctx.canonical(key), dim, self.node.name))
        return ids

    def consume_param(self, key: str, dim: int) -> None:
        """Declare that this param dim contracts over channels (verify zeroes its dropped slices)."""
        self.ctx.param(key)
        self.ctx.param_sinks.append((self.ctx.canonical(key), dim))

    def weighted_consumer(self, weight: str, in_dim: int, bias: Optional[str], x: Any, channel_dim: int,
                 exact: bool = True) -> None:
        """Declare a consumer whose bias can absorb dropped inputs' constants (``propagate_bias``)."""
        if isinstance(x, fx.Node):
            bias = None if bias is None else self.ctx.canonical(bias)
            self.ctx.weighted_consumers.append(WeightedConsumer(self.node.name, self.ctx.canonical(weight), in_dim,
                                                                bias, x.name, channel_dim, exact))

    def consume_act(self, arg: int, dim: int, ids: Optional[torch.Tensor]) -> None:
        """Declare that input ``arg`` is contracted over ``dim`` (verify masks it)."""
        if ids is not None:
            self.ctx.act_sinks.append(ActSink(self.node.name, arg, dim, ids))

    def normalizes(self, kept_only: Callable, x: Any, dims: Any, *args: Any) -> None:
        """Declare that this node computes a statistic of ``x`` over ``dims`` (LayerNorm, a mean...):
        verify's reference runs ``kept_only(x, keep, *args)`` in its place, the statistic over kept
        positions only. Dims without channels are left out; nothing is recorded if none has any."""
        x_ids = self.ids(x)
        if not isinstance(x, fx.Node) or not isinstance(x_ids, tuple):
            return
        dims = tuple(sorted({d % len(x_ids) for d in dims if x_ids[d % len(x_ids)] is not None}))
        if dims:
            self.ctx.norm_sites.append(NormSite(self.node.name, dims, tuple(x_ids[d] for d in dims),
                                                kept_only, (x, *args)))

    def equal_pieces(self, arrays: list[torch.Tensor]) -> None:
        """Declare that these pieces of one dim must keep equal sizes (the code splits at ``size // n``)."""
        self.ctx.pieces.append(Pieces(tuple(arrays), self.where()))

    def fixed(self, value: Any = None) -> Any:
        """A channel map with no channel on any dim, shaped like ``value`` (default: the output)."""
        return fixed_like(self.out if value is None else value)


# --- weights seen through quantizers ---------------------------------------------------------------
SCALES = (torch.ops.aten.mul.Tensor, torch.ops.aten.div.Tensor, torch.mul, torch.div, operator.mul, operator.truediv)
"""Scaling a weight by a broadcast factor (QAT's folded BatchNorm: ``w * (gamma / sigma)``) keeps its
channels."""


def weight_source(node: Any, gm: fx.GraphModule) -> Any:
    """The ``get_attr`` a weight argument is read from, through quantizers and broadcast scaling
    (``fake_quant(w * (gamma / sigma))`` after ``prepare_qat_pt2e``); else ``node`` itself."""
    while isinstance(node, fx.Node) and node.op != "get_attr":
        if node.op == "call_module" and is_quantizer(gm.get_submodule(node.target)):
            node = node.args[0]
        elif node.op == "call_function" and node.target in SCALES and _scales(node):
            node = node.args[0]
        else:
            return node
    return node


def _scales(node: fx.Node) -> bool:
    """``a * s`` or ``a / s`` where ``s`` broadcasts to ``a``'s shape (fewer elements, same rank)."""
    a, s = node.args[0], node.args[1]
    if not (isinstance(a, fx.Node) and isinstance(s, fx.Node)):
        return False
    va, vs = a.meta.get("val"), s.meta.get("val")
    if not (isinstance(va, torch.Tensor) and isinstance(vs, torch.Tensor)) or va.dim() != vs.dim():
        return False
    return all(b in (1, n) for b, n in zip(vs.shape, va.shape)) and vs.numel() < va.numel()
