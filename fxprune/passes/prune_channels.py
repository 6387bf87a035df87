"""``prune-channels``: one-shot structured pruning of a captured graph, as a pass.

The pass is :func:`fxprune.prune` with its options as typed fields: capture (of the graph as it is,
at its own level), match, score, select, rewrite. It is *one-shot*: it prunes the graph it is given
once; running it again (``PassManager(steps=2)``, or twice in a pipeline) prunes the result again.
The example inputs are zeros shaped like the placeholders' traced values (only shapes matter to the
magnitude criteria; the activation criteria read calibration data, bound with ``with_calibration``
or given to the pipeline). ``taylor`` and ``hessian`` need a loss function, so they are not options
here: call :func:`fxprune.prune` directly for them.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch.fx as fx

from fxprune.core.capture import graph_level
from fxprune.passes.pipeline import placeholder_zeros, record_plan, register, run_data
from fxprune.passes.selection import selection_options
from fxprune.stages import run


@register
@dataclass(frozen=True)
class PruneChannels(selection_options("PruneChannelsOptions")):
    """Drop the lowest-scoring channels of every prunable group (see :func:`fxprune.prune`)."""

    name = "prune-channels"

    sparsity: float = field()  # required here (no default): a one-shot prune names its sparsity
    """Fraction of each group's units to drop, in [0, 1)."""

    def apply(self, gm: fx.GraphModule) -> fx.GraphModule:
        result = run(gm, placeholder_zeros(gm), self.prune_options(graph_level(gm)), data=run_data(self))
        return record_plan(result.graph_module, result.plan)  # what recovery passes map layers with
