"""``dead-channels``: drop the channels that no output depends on.

A channel is dead when nothing reads it: a conv whose output is only used through ``x[:, :8]``
(channels 8.. are computed, then thrown away), a concatenation of which only a part is used, the
half of a ``split`` that is never taken. Dropping a dead channel removes the weights that compute it
and changes no output.

**How deadness is decided** — from the facts the analysis already records, with no new walk over the
graph's values. Every rule either carries an input channel position into its output's channel map or
records a fact about it: a contraction *reads* it (``consume_param``: conv / linear input columns;
``consume_act``: matmul, sum), an op that cannot keep it apart *freezes* it (a graph output, an op
without a rule, softmax, a mean over channels, a single channel picked by index), a channel-mixing op
marks it *approximate* (LayerNorm statistics). The only other way a position leaves the graph is a
slice or split that leaves it behind. So a class of channels is **live** when it is frozen,
approximate, or contracted somewhere (a position of it in a param sink's dim or in an activation sink),
and — conservatively — when a shape query (``x.size(1)``, ``x.shape``, ``x.numel()``) reads the dim
holding it, since its count could leak into a value. Every other class of a group is **dead**.

Dead classes are dropped with :func:`fxprune.core.rewrite.rewrite`, like pruned ones, except that a tensor
dim is never emptied: where every channel of a dim is dead (a conv feeding only the unused half of a
``cat``), its first channel stays — deleting a whole unused layer is dead-code elimination, not
channel pruning. Nothing that reads a dead channel remains, so the result computes the same outputs as
the input (its verify reference zeroes nothing).
"""
from __future__ import annotations

import builtins
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import torch.fx as fx

from fxprune.core.analysis import Analysis
from fxprune.core.channels import Dropped
from fxprune.core.graph import iter_arrays
from fxprune.core.capture import graph_level
from fxprune.options import PruneOptions
from fxprune.stages import analyze
from fxprune.passes.pipeline import Pass, placeholder_zeros, refresh_values, register
from fxprune.core.rewrite import rewrite
from fxprune.core.predicates import is_tensor

aten = torch.ops.aten

# Queries whose result depends on how many channels a dim holds (x.dim() or x.dtype do not).
COUNT_QUERIES = ("size", "numel", "nelement", builtins.getattr, builtins.len, torch.numel,
                 aten.sym_size, aten.sym_numel)


def _mark(live: torch.Tensor, analysis: Analysis, ids: Optional[torch.Tensor]) -> None:
    if ids is not None:
        live[analysis.solution.root[ids[ids >= 0]]] = True


def _query_key(node: fx.Node) -> object:
    return node.target if node.op == "call_method" else getattr(node.target, "overloadpacket", node.target)


def _queried_dims(analysis: Analysis) -> Iterator[torch.Tensor]:
    """The channel ids of every tensor dim a count query reads (every dim unless one is named)."""
    for node in analysis.gm.graph.nodes:
        if node.op not in ("call_method", "call_function") or not node.args or not is_tensor(node.args[0]):
            continue
        key = _query_key(node)
        if key not in COUNT_QUERIES:
            continue
        ids = analysis.env.get(node.args[0]) or ()
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        if isinstance(dim, int) and key in ("size", aten.sym_size):
            ids = ids[dim:][:1]
        yield from iter_arrays(ids)


def live_classes(analysis: Analysis) -> torch.Tensor:
    """Bool per channel id, true on the roots of classes that something reads (see module doc)."""
    solution = analysis.solution
    live = solution.frozen | solution.approximate
    for key, dim in analysis.param_sinks:
        _mark(live, analysis, analysis.params[key][dim])
    for sink in analysis.act_sinks:
        _mark(live, analysis, sink.ids)
    for ids in _queried_dims(analysis):
        _mark(live, analysis, ids)
    return live


def dead_classes(analysis: Analysis) -> Dropped:
    """The dead classes of every group, to drop."""
    live = live_classes(analysis)
    drop = torch.zeros_like(live)
    for group in analysis.groups:
        units = torch.tensor(group.units, dtype=torch.long)
        drop[units[~live[units]]] = True
    _keep_one_per_dim(analysis, drop)
    return Dropped(drop)


def _keep_one_per_dim(analysis: Analysis, drop: Dropped) -> None:
    """Where a tensor dim would lose every channel, its first one stays."""
    root = analysis.solution.root
    for ids in analysis.id_arrays():
        if ids.numel() and bool((ids >= 0).all()) and bool(drop[root[ids]].all()):
            drop[root[ids[0]]] = False


@register
@dataclass(frozen=True)
class DeadChannels(Pass):
    """Drop every channel that no output, contraction or unknown op reads; outputs are unchanged."""

    name = "dead-channels"

    def apply(self, gm: fx.GraphModule) -> fx.GraphModule:
        analysis = analyze(gm, placeholder_zeros(gm), PruneOptions(capture=graph_level(gm)))
        return refresh_values(rewrite(analysis, dead_classes(analysis)))
