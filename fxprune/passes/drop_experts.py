"""``drop-experts``: remove whole routed experts of mixture-of-experts layers, with their router rows.

MoE layers are found in the graph (:mod:`fxprune.core.experts`: a router linear, a top-k, and experts
as an unrolled loop over a ``ModuleList`` or as parameters stacked on dim 0, as transformers 5's
Mixtral, OLMoE and Qwen-MoE export), scored (:mod:`fxprune.data.expert_criteria`: ``reap``,
``frequency``, ``weight-norm``, ``random``) or named with ``experts=[...]``, and removed: the router's
rows, the experts' modules or dim-0 slices, and the literal expert counts of the routing (``one_hot``
classes, ``histc`` bins) go; the kept experts are renumbered. Every layer loses the same number of
experts (its own lowest-scoring ones). Exact: the result equals the original whose routers never pick a
removed expert (their logits at ``-inf`` before the softmax and top-k, :func:`verify_experts`), at both
graph levels. A top-k larger than the experts kept, or removing every expert, is a typed error; a
layer the pass does not understand is left as it is and listed in the record with the reason.

>>> result = DropExperts(count=1, criterion="frequency").with_calibration(loader)(gm)  # doctest: +SKIP
>>> result.graph_module.meta["fxprune_dropped_experts"]["dropped"]                     # doctest: +SKIP
{'model.layers.0.mlp': [2], 'model.layers.1.mlp': [0]}
>>> Pipeline.parse("drop-experts{sparsity=0.25,criterion=weight-norm}")(gm)             # doctest: +SKIP
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Optional

import torch.fx as fx

from fxprune.core.experts import Experts, drop_experts, find_experts, routed_reference
from fxprune.core.verify import VerifyReport, compare
from fxprune.data.expert_criteria import CALIBRATED, check_expert_criterion, expert_scores, lowest
from fxprune.errors import CalibrationError, InvalidOptionError
from fxprune.options import same_as
from fxprune.passes.pipeline import Pass, refresh_values, register

#: ``gm.meta`` key of what the pass removed: criterion, {layer: dropped indices}, scores, rejected.
DROPPED_KEY = "fxprune_dropped_experts"


@register
@dataclass(frozen=True)
class DropExperts(Pass):
    """Whole experts removed from every MoE layer: its ``count`` (or ``sparsity``) lowest, or those named."""

    name = "drop-experts"
    needs_calibration = True

    count: int = 0
    """How many experts to remove from each MoE layer (0: from ``sparsity``)."""
    sparsity: float = 0.0
    """The fraction of each layer's experts to remove (rounded), when ``count`` is 0."""
    criterion: str = same_as("expert_criterion")
    """``reap``, ``frequency`` (calibration data), ``weight-norm`` (data-free) or ``random``: the
    ``expert_criterion`` option of :class:`~fxprune.options.PruneOptions` (the HF route's)."""
    experts: tuple[str, ...] = ()
    """Remove exactly these experts (no data is read): ``"2"`` from every MoE layer, ``"model.layers.0.mlp:2"``
    from that layer alone."""
    seed: int = 0
    """The seed of ``random``."""

    def validate(self) -> None:
        check_expert_criterion(self.criterion)
        if not 0.0 <= self.sparsity < 1.0:
            raise InvalidOptionError(f"drop-experts: sparsity must be in [0, 1), got {self.sparsity!r}")
        if self.count < 0:
            raise InvalidOptionError(f"drop-experts: count must be >= 0, got {self.count!r}")

    def with_calibration(self, calibration: Any, source: Any = None) -> "DropExperts":
        """This pass with calibration batches bound (read by ``reap`` and ``frequency``)."""
        bound = copy.copy(self)
        object.__setattr__(bound, "_bound", calibration)
        return bound

    def apply(self, gm: fx.GraphModule) -> fx.GraphModule:
        found = find_experts(gm)
        if not found.layers:
            why = "; ".join(f"{n}: {r}" for n, r in found.rejected[:3]) or "no top-k router in the graph"
            raise InvalidOptionError(f"drop-experts: the graph has no MoE layer whose experts can be removed ({why})")
        removed, scores = self._removed(gm, found)
        new = drop_experts(gm, found, removed)
        new.meta[DROPPED_KEY] = {"criterion": "named" if self.experts else self.criterion,
                                 "dropped": {n: list(d) for n, d in removed.items()},
                                 "scores": {n: [float(v) for v in s] for n, s in scores.items()},
                                 "rejected": [list(r) for r in found.rejected]}
        return refresh_values(new)

    def _removed(self, gm: fx.GraphModule, found: Experts) -> tuple[dict, dict]:
        if self.experts:
            return found.pick(named_experts(self.experts, found)), {}
        calibration = self.__dict__.get("_bound")
        if calibration is None and self.criterion in CALIBRATED:
            raise CalibrationError(f"pass {self.name!r} with criterion {self.criterion!r} scores experts on "
                                   f"calibration data: bind it with DropExperts(...).with_calibration(loader), "
                                   f"or use criterion='weight-norm'")
        scores = expert_scores(gm, found, self.criterion, calibration, self.seed)
        wanted = {layer.name: self.count or round(self.sparsity * layer.num_experts) for layer in found.layers}
        return found.pick({n: lowest(scores[n], wanted[n]) for n in wanted}), scores


def named_experts(names: tuple[str, ...], found: Experts) -> dict[str, list[int]]:
    """``("2", "layer:0")`` -> {layer: indices}: a bare index names that expert of every layer."""
    out: dict[str, list[int]] = {}
    for name in names:
        layer, _, index = name.rpartition(":")
        if not index.strip().lstrip("-").isdigit():
            raise InvalidOptionError(f"drop-experts: {name!r} names no expert (use 'INDEX' or 'LAYER:INDEX')")
        for target in ([layer] if layer else found.names):
            out.setdefault(target, []).append(int(index))
    return out


def verify_experts(original: fx.GraphModule, pruned: fx.GraphModule, inputs: tuple,
                   tolerance: Optional[float] = None) -> VerifyReport:
    """``pruned`` (a ``drop-experts`` output) against ``original`` whose routers never pick the removed
    experts; the drift from ``original`` is reported beside it."""
    record = pruned.meta.get(DROPPED_KEY)
    if record is None:
        raise InvalidOptionError(f"the graph carries no {DROPPED_KEY!r} record: it is not a drop-experts output")
    reference = routed_reference(original, find_experts(original), record["dropped"])
    return compare(reference, pruned, inputs, True, tolerance, original=original)


__all__ = ["DropExperts", "named_experts", "verify_experts", "DROPPED_KEY"]
