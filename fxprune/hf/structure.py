"""Whole structures before widths: ``fxprune.hf.prune``'s sparsity may name the layer count
(``num_hidden_layers``, :mod:`fxprune.hf.depth`) and the expert count (``num_experts`` /
``num_local_experts``, :mod:`fxprune.hf.experts`) beside widths. They run in that order, each on the
model the previous one returned, then the widths left (if any) on the result; one
:class:`~fxprune.hf.HFPruneResult` holds every change and ``config.fxprune`` every record.

>>> fxprune.hf.prune(model, (ids,), sparsity={"num_hidden_layers": 0.25, "num_experts": 0.25,
...                                           "intermediate_size": 0.2}, calibration=batches)  # doctest: +SKIP
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

from fxprune.hf import depth as hf_depth, experts as hf_experts
from fxprune.options import PruneOptions

#: The config fields a sparsity names to remove whole structures, by what they count.
FIELDS = {"layer count": hf_depth.DEPTH_FIELDS, "expert count": hf_experts.EXPERT_FIELDS}


@dataclass(frozen=True)
class Structure:
    """What sparsity asks of whole structures, and the rest (widths, or None)."""

    layers: Optional[float]
    experts: Optional[float]
    rest: Any

    @property
    def any(self) -> bool:
        return self.layers is not None or self.experts is not None


def split(sparsity: Any) -> Structure:
    layers, rest = hf_depth.split_depth(sparsity)
    experts, rest = hf_experts.split_experts(rest) if rest is not None else (None, None)
    return Structure(layers, experts, rest)


def run(model: Any, wanted: Structure, inputs: tuple, calibration: Any, options: PruneOptions,
        steps: Mapping[str, Any], widths: Callable[[Any, Any], Any], adapter: Any) -> Any:
    """Depth, then experts, then ``widths(model, rest)``; ``options``: the run's (``block_criterion``,
    ``block_repair``, ``expert_criterion``, ``seed``); ``steps``: ``dynamic_shapes`` and ``tolerance``;
    ``adapter``: the HF adapter's shared steps and its result type (handed in: this module does not
    import :mod:`fxprune.hf` back)."""
    changes: dict[str, tuple[Any, Any]] = {}
    records: dict[str, Any] = {}
    depth = None
    if wanted.layers is not None:
        depth = hf_depth.prune_depth(model, inputs, wanted.layers, adapter, calibration, options.block_criterion,
                                     options.block_repair, steps["dynamic_shapes"], steps["tolerance"])
        model, records["depth"] = depth.model, depth.record
        changes.update(depth.changes)
    if wanted.experts is not None:
        experts = hf_experts.prune_experts(model, inputs, wanted.experts, calibration, options.expert_criterion,
                                           options.seed, steps["tolerance"])
        model, records["experts"] = experts.model, experts.record
        changes.update(experts.changes)
    listed = {k: [a, b] for k, (a, b) in changes.items()}
    if wanted.rest is None:
        model.config.fxprune = {"format": adapter.format, "changes": listed, **records}
        return adapter.result(model, None, changes, 0.0, depth)
    out = widths(model, wanted.rest)
    record = dict(out.model.config.fxprune)
    record.update(records, changes={**listed, **record["changes"]})
    out.model.config.fxprune = record
    return adapter.result(out.model, out.result, {**changes, **out.changes}, out.max_abs_error, depth)


__all__ = ["FIELDS", "Structure", "split", "run"]
