"""Match: propagate channel ids through a captured graph with the per-op rule table.

One walk over the nodes in topological order. Each node's rule (``fxprune.rules``) receives an
:class:`OpCall` — the node, its module if any, the channel maps of its inputs — and returns the channel
map of its output, recording facts on the :class:`~fxprune.channels.ChannelTable` as it goes. A node
without a rule freezes every channel it touches: unknown ops are never guessed to be element-wise.

The result, :class:`Analysis`, keeps what later stages need (the solved classes, the producers, the
consumers whose inputs verify zeroes) and exposes the user-facing ``groups``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Mapping, Optional

import torch
import torch.fx as fx

from .capture import has_hooks
from .channels import ChannelTable, Solution, TensorIds
from .graph import describe_target, fixed_like, has_value, iter_arrays, meta_value, tensor_at  # noqa: F401,E501
from .groups import Group, build_groups
from .predicates import weight_source
from .registry import lookup_analyze, run_after_rule


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
class Foldable:
    """A conv/linear whose dropped inputs' constant part can be folded into its bias."""

    node: str
    weight: str
    in_dim: int
    bias: Optional[str]
    input: str
    channel_dim: int
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
    foldables: list[Foldable] = field(default_factory=list)
    norm_sites: list[NormSite] = field(default_factory=list)
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


@dataclass(frozen=True)
class Analysis:
    """The result of :func:`match`: channel classes, groups and what rewrite and verify need.

    Immutable: sequences are stored as tuples and mappings as read-only views (``MappingProxyType``),
    whatever the constructor was given, so no later stage can change what another one reads.
    """

    gm: fx.GraphModule
    level: str
    env: Mapping[fx.Node, Any]
    params: Mapping[str, TensorIds]
    solution: Solution
    producers: tuple[Producer, ...]
    param_sinks: tuple[tuple[str, int], ...]
    act_sinks: tuple[ActSink, ...]
    groups: tuple[Group, ...]
    foldables: tuple[Foldable, ...] = ()
    aliases: Mapping[str, str] = field(default_factory=dict)
    norm_sites: tuple[NormSite, ...] = ()

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
            elif isinstance(value, dict):
                object.__setattr__(self, name, MappingProxyType(dict(value)))

    def canonical(self, key: str) -> str:
        return self.aliases.get(key, key)

    def id_arrays(self) -> list[torch.Tensor]:
        """Every distinct per-position id array: each tensor dim and parameter dim that has channels
        (pass-through ops hand on the same array, so arrays are deduplicated by identity)."""
        arrays = list(iter_arrays(list(self.env.values()))) + \
            [ids for dims in self.params.values() for ids in dims if ids is not None]
        return list({id(ids): ids for ids in arrays}.values())

    def tensor(self, key: str) -> torch.Tensor:
        return tensor_at(self.gm, key)


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

    def foldable(self, weight: str, in_dim: int, bias: Optional[str], x: Any, channel_dim: int,
                 exact: bool = True) -> None:
        """Declare a consumer whose bias can absorb dropped inputs' constants (``propagate_bias``)."""
        if isinstance(x, fx.Node):
            bias = None if bias is None else self.ctx.canonical(bias)
            self.ctx.foldables.append(Foldable(self.node.name, self.ctx.canonical(weight), in_dim, bias,
                                               x.name, channel_dim, exact))

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

    def fixed(self, value: Any = None) -> Any:
        """A channel map with no channel on any dim, shaped like ``value`` (default: the output)."""
        return fixed_like(self.out if value is None else value)


# --- the walk ----------------------------------------------------------------------------------
def match(gm: fx.GraphModule, level: str, options: AnalysisOptions = AnalysisOptions()) -> Analysis:
    """Propagate channel ids through ``gm`` (which must carry traced values, see capture)."""
    ctx = Context(gm, options)
    for node in gm.graph.nodes:
        ctx.env[node] = _visit(ctx, node, lookup_analyze)
    solution = ctx.table.solve()
    groups = build_groups(ctx.params, ctx.producers, solution)
    return Analysis(gm, level, ctx.env, ctx.params, solution, ctx.producers, ctx.param_sinks,
                    ctx.act_sinks, groups, ctx.foldables, ctx.aliases, tuple(ctx.norm_sites))


def _visit(ctx: Context, node: fx.Node, lookup: Callable) -> Any:
    if node.op == "placeholder":
        return fixed_like(meta_value(node)) if has_value(node) else None
    if node.op == "get_attr":
        return _visit_get_attr(ctx, node)
    if node.op == "output":
        if not ctx.options.prune_outputs:
            op = OpCall(ctx, node, None)
            op.freeze(op.ids(node.args[0]), "reaches a graph output (a fixed interface)")
        return None
    module = ctx.gm.get_submodule(node.target) if node.op == "call_module" else None
    op = OpCall(ctx, node, module)
    if module is not None and has_hooks(module):
        return _freeze_all(op, f"{describe_target(node)} has forward hooks, which fxprune cannot see into")
    rule = lookup(node, module)
    if rule is None:
        return _freeze_all(op, f"no rule for {describe_target(node)}")
    try:
        out = rule(op)
    except Unsupported as exc:
        return _freeze_all(op, str(exc))
    run_after_rule(op, rule)  # rules.shape's freeze_read_sizes
    return out


def _visit_get_attr(ctx: Context, node: fx.Node) -> Any:
    value = tensor_at(ctx.gm, str(node.target), missing_ok=True)
    return ctx.param(str(node.target)) if value is not None else None


def _freeze_all(op: OpCall, reason: str) -> Any:
    """The conservative default: every channel in every input stays; outputs carry none."""
    op.freeze(op.ids(list(op.node.args)), reason)
    op.freeze(op.ids(list(op.node.kwargs.values())), reason)
    return op.fixed() if has_value(op.node) else None


