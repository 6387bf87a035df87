"""``prune-channels``: one-shot structured pruning of a captured graph, as a pass.

The pass is :func:`fxprune.prune` with its options as typed fields: capture (of the graph as it is,
at its own level), match, score, select, rewrite. It is *one-shot*: it prunes the graph it is given
once; running it again (``PassManager(steps=2)``, or twice in a pipeline) prunes the result again.
The example inputs are zeros shaped like the placeholders' traced values (only shapes matter to the
magnitude criteria); ``criterion="taylor"`` needs a loss and a batch, so it is not an option here —
call :func:`fxprune.prune` directly for it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx

from fxprune.api import prune
from fxprune.capture import graph_level
from fxprune.errors import InvalidOptionError
from fxprune.importance import CRITERIA, check_criterion
from fxprune.pipeline import Pass, example_inputs, register
from fxprune.select import Policy


@register
@dataclass(frozen=True)
class PruneChannels(Pass):
    """Drop the lowest-scoring channels of every prunable group (see :func:`fxprune.prune`)."""

    name = "prune-channels"

    sparsity: float
    """Fraction of each group's units to drop, in [0, 1)."""
    criterion: str = "l1"
    """Importance: ``l1``, ``l2``, ``fpgm``, ``bn_scale`` or ``random``."""
    reduce: str = "mean"
    """How a unit's scores over several members combine: ``mean``, ``sum`` or ``max``."""
    global_ranking: bool = False
    """Rank the units of all groups together (scores normalised per group) instead of per group."""
    round_to: int = 1
    """Kept counts are rounded up to a multiple of this."""
    min_keep: int = 1
    """No group (and no tensor dim it spans) keeps fewer units than this."""
    ignore: tuple[str, ...] = ()
    """fnmatch patterns of module names whose groups are left whole."""
    prune_outputs: bool = False
    """Also prune channels that reach a graph output (changes the output shape)."""
    seed: int = 0
    """Seed of the ``random`` criterion."""
    split_axis: str = "largest"
    """Which axis carries the channels when a view splits a channel dim (``largest`` or ``outer``)."""

    def validate(self) -> None:
        if self.criterion not in CRITERIA or self.criterion == "taylor":
            raise InvalidOptionError(f"criterion {self.criterion!r} is not a prune-channels option; "
                                     f"expected one of {[c for c in CRITERIA if c != 'taylor']}")
        check_criterion(self.criterion, self.reduce)
        Policy(self.sparsity, self.global_ranking, self.round_to, self.min_keep, self.ignore)
        if self.split_axis not in ("largest", "outer"):
            raise InvalidOptionError(f"split_axis must be 'largest' or 'outer', got {self.split_axis!r}")

    def apply(self, gm: fx.GraphModule) -> fx.GraphModule:
        return prune(gm, example_inputs(gm), sparsity=self.sparsity, criterion=self.criterion,
                     capture=graph_level(gm), reduce=self.reduce, global_ranking=self.global_ranking,
                     round_to=self.round_to, min_keep=self.min_keep, ignore=self.ignore,
                     prune_outputs=self.prune_outputs, seed=self.seed,
                     split_axis=self.split_axis).graph_module
