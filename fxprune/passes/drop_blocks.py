"""``drop-blocks``: remove whole residual blocks (``y = x + f(x)`` with ``f`` gone).

Blocks are found in the graph (:mod:`fxprune.core.blocks`: LLM decoder layers, ResNet blocks with an
identity shortcut, ViT blocks; a downsampling block is not a candidate and the report says why),
scored on calibration data (:mod:`fxprune.data.block_criteria`: ``block-influence``, ``angular``,
``sleb``) or named with ``blocks=[...]``, and removed: each of their adds becomes its shortcut and the
branch, with the parameters only it read, is gone. Exact: before ``repair``, the result equals the
original with those branches multiplied by zero (:func:`verify_drop`), at both graph levels. The
original's parameter names are kept (``layers.5`` stays ``layers.5``; the HF adapter renumbers).

``repair=true`` refits, per run of removed blocks, the linear layer that writes into the stream just
before it, by least squares on the calibration data pulled toward its old weight (``fit``, ``ridge``;
the report gives its error before and after); ``walk=sequential`` refits every kept block's last
writer from there on, so that the stream after it matches the original's.

>>> result = DropBlocks(count=2, criterion="angular").with_calibration(loader)(gm)       # doctest: +SKIP
>>> result.graph_module.meta["fxprune_dropped_blocks"]["dropped"]                       # doctest: +SKIP
['layers.3', 'layers.4']
>>> Pipeline.parse("drop-blocks{sparsity=0.25,criterion=sleb}")(gm, calibration=loader)  # doctest: +SKIP
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch.fx as fx

from fxprune.core.blocks import Blocks, drop_blocks, find_blocks, zeroed_reference
from fxprune.core.verify import VerifyReport, compare
from fxprune.data.block_criteria import (BLOCK_CRITERIA, DEFAULT_FIT, DEFAULT_RIDGE, DEFAULT_WALK,
                                         check_block_criterion, check_count, check_repair_fit, check_repair_walk,
                                         choose_blocks, repair)
from fxprune.errors import CalibrationError, InvalidOptionError
from fxprune.options import same_as
from fxprune.passes.pipeline import Pass, register

#: ``gm.meta`` key of what the pass removed: criterion, dropped names, scores, rejected, repairs.
DROPPED_KEY = "fxprune_dropped_blocks"


@register
@dataclass(frozen=True)
class DropBlocks(Pass):
    """Whole residual blocks removed: the lowest-scoring ``count`` (or ``sparsity`` of them), or those named."""

    name = "drop-blocks"
    needs_calibration = True

    count: int = 0
    """How many blocks to remove (0: from ``sparsity``)."""
    sparsity: float = 0.0
    """The fraction of the removable blocks to remove (rounded), when ``count`` is 0."""
    criterion: str = same_as("block_criterion")
    """``block-influence``, ``angular`` (that many consecutive blocks) or ``sleb`` (greedy loss): the
    ``block_criterion`` option of :class:`~fxprune.options.PruneOptions` (the HF route's)."""
    blocks: tuple[str, ...] = ()
    """Remove exactly these blocks (module paths); no calibration data is read unless ``repair``."""
    repair: bool = same_as("block_repair")
    """Repair the removed blocks by least squares on the calibration data (``block_repair``; ``walk``
    says which linears are refitted)."""
    walk: str = DEFAULT_WALK
    """Which linears the repair refits: ``run`` (the one writing into the stream just before each removed
    run), ``sequential`` (the last writer of every kept block from there on, each on the inputs the
    repaired model gives it, toward the original's stream) or ``sequential-all`` (every writer of those
    blocks): :data:`~fxprune.data.block_criteria.REPAIR_WALKS`, ``block_repair``'s word on the HF route."""
    fit: str = DEFAULT_FIT
    """How the repair refits: ``refit`` (a new weight, ridge toward zero), ``toward-original`` (ridge
    toward the old weight), ``output-map`` (``T W``, ``T`` of the stream's width, ridge toward the
    identity) or ``scale`` (one scale per output channel): :data:`~fxprune.data.block_criteria.REPAIR_FITS`."""
    ridge: float = DEFAULT_RIDGE
    """Damping of the repair's normal equations, relative to their mean diagonal (``tr(G) / n``)."""

    def validate(self) -> None:
        check_block_criterion(self.criterion)
        check_repair_fit(self.fit)
        check_repair_walk(self.walk)
        if not 0.0 <= self.sparsity < 1.0:
            raise InvalidOptionError(f"drop-blocks: sparsity must be in [0, 1), got {self.sparsity!r}")
        if self.count < 0:
            raise InvalidOptionError(f"drop-blocks: count must be >= 0, got {self.count!r}")
        if self.ridge < 0:
            raise InvalidOptionError(f"drop-blocks: ridge must be >= 0, got {self.ridge!r}")

    def with_calibration(self, calibration: Any, source: Any = None, loss: Optional[Callable] = None) -> "DropBlocks":
        """This pass with calibration batches bound (and, for ``sleb``, a ``loss(outputs, inputs)``)."""
        bound = copy.copy(self)
        object.__setattr__(bound, "_bound", (calibration, loss))
        return bound

    def removed_count(self, found: Blocks) -> int:
        wanted = self.count or round(self.sparsity * len(found.blocks))
        return check_count(len(self.blocks) if self.blocks else wanted, found)

    def apply(self, gm: fx.GraphModule) -> fx.GraphModule:
        calibration, loss = self.__dict__.get("_bound", (None, None))
        found = find_blocks(gm)
        count = self.removed_count(found)
        if calibration is None and (self.repair or not self.blocks) and count:
            raise CalibrationError(f"pass {self.name!r} scores blocks on calibration data: bind it with "
                                   f"DropBlocks(...).with_calibration(loader), or name blocks=[...]")
        chosen, scores = (tuple(found.pick(self.blocks)), {}) if self.blocks else \
            _chosen(gm, found, calibration, count, self.criterion, loss)
        names = tuple(b.name for b in chosen)
        new = drop_blocks(gm, chosen)
        repairs = repair(gm, new, found, chosen, calibration, self.ridge, self.fit, self.walk) \
            if self.repair and chosen else []
        new.meta[DROPPED_KEY] = {"criterion": "named" if self.blocks else self.criterion, "dropped": list(names),
                                 "scores": scores, "rejected": [list(r) for r in found.rejected],
                                 "repairs": [str(r) for r in repairs]}
        return new


def _chosen(gm: fx.GraphModule, found: Blocks, calibration: Any, count: int, criterion: str,
            loss: Optional[Callable]) -> tuple[tuple, dict]:
    names, scores = choose_blocks(gm, found, calibration, count, criterion, loss)
    return found.pick(names), scores


def verify_drop(original: fx.GraphModule, pruned: fx.GraphModule, inputs: tuple,
                tolerance: Optional[float] = None) -> VerifyReport:
    """``pruned`` (a ``drop-blocks`` output, before repair) against ``original`` with the dropped
    blocks' branches multiplied by zero; the drift from ``original`` is reported beside it."""
    record = pruned.meta.get(DROPPED_KEY)
    if record is None:
        raise InvalidOptionError(f"the graph carries no {DROPPED_KEY!r} record: it is not a drop-blocks output")
    reference = zeroed_reference(original, find_blocks(original).pick(record["dropped"]))
    return compare(reference, pruned, inputs, True, tolerance, original=original)


__all__ = ["DropBlocks", "verify_drop", "DROPPED_KEY", "BLOCK_CRITERIA"]
