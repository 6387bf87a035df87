"""Match: propagate channel ids through a captured graph with the per-op rule table.

One walk over the nodes in topological order. Each node's rule (``fxprune.core.rules``) receives an
:class:`OpCall` — the node, its module if any, the channel maps of its inputs — and returns the channel
map of its output, recording facts on the :class:`~fxprune.core.channels.ChannelTable` as it goes. A node
without a rule freezes every channel it touches: unknown ops are never guessed to be element-wise.

The result, :class:`Analysis`, keeps what later stages need (the solved classes, the producers, the
consumers whose inputs verify zeroes) and exposes the user-facing ``groups``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Mapping

import torch
import torch.fx as fx

from fxprune.core.capture import has_hooks
from fxprune.core.channels import Solution, TensorIds
from fxprune.core.graph import describe_target, fixed_like, has_value, iter_arrays, meta_value, tensor_at
from fxprune.core.groups import Group, build_groups
from fxprune.core.lockstep import Lockstep, settle
from fxprune.core.opcall import (ActSink, AnalysisOptions, Context, NormSite, OpCall, Producer,  # noqa: F401
                                 Unsupported, WeightedConsumer)
from fxprune.core.registry import lookup_analyze, run_after_rule


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
    weighted_consumers: tuple[WeightedConsumer, ...] = ()
    aliases: Mapping[str, str] = field(default_factory=dict)
    norm_sites: tuple[NormSite, ...] = ()
    locksteps: tuple[Lockstep, ...] = ()
    """Units that drop in fixed proportions so that every chunk's pieces stay equal (selection reads them)."""

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


# --- the walk ----------------------------------------------------------------------------------
def match(gm: fx.GraphModule, level: str, options: AnalysisOptions = AnalysisOptions()) -> Analysis:
    """Propagate channel ids through ``gm`` (which must carry traced values, see capture)."""
    ctx = Context(gm, options)
    for node in gm.graph.nodes:
        ctx.env[node] = _visit(ctx, node, lookup_analyze)
    solution, locksteps = settle(ctx.pieces, ctx.table.solve())
    groups = build_groups(ctx.params, ctx.producers, solution, ties=[lock.units for lock in locksteps])
    return Analysis(gm, level, ctx.env, ctx.params, solution, ctx.producers, ctx.param_sinks,
                    ctx.act_sinks, groups, ctx.weighted_consumers, ctx.aliases, tuple(ctx.norm_sites), locksteps)


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


