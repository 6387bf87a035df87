"""Which experts of a MoE layer to remove: one score per expert (higher is kept), read from the graph.

The criteria of :data:`fxprune.options.EXPERT_CRITERIA`, on the MoE layers
:func:`fxprune.core.experts.find_experts` finds (the HF adapter's, :mod:`fxprune.hf.experts`, read the
same quantities through module hooks):

- ``reap`` (REAP): the mean, over the tokens routed to an expert, of its gate value times the norm of
  its output — the norm of the contribution its lane adds (``w · expert(x)``, zero for tokens not routed
  to it), summed over rows and divided by the expert's routed-token count (calibration data). Stacked
  experts are read where the graph sorts tokens by expert (``grouped_mm``): the gate-weighted outputs,
  one row per (token, chosen expert), in the order of the sorted expert ids;
- ``frequency``: how many calibration tokens the router sends to it (the top-k's index output);
- ``weight-norm``: the Frobenius norm of its weights (data-free);
- ``random``: seeded, a baseline.

>>> scores = expert_scores(gm, find_experts(gm), "frequency", loader)                 # doctest: +SKIP
>>> lowest(scores[""], 1)                                                            # doctest: +SKIP
[3]
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.fx as fx

from fxprune.core.experts import Experts, MoELayer
from fxprune.core.graph import attribute
from fxprune.data.calibration import run_batches, token_rows
from fxprune.errors import CalibrationError, InvalidOptionError
from fxprune.options import EXPERT_CRITERIA, keyed_by

#: The criteria that read calibration data.
CALIBRATED = ("reap", "frequency")


def check_expert_criterion(criterion: Any) -> str:
    if criterion not in EXPERT_CRITERIA:
        raise InvalidOptionError(f"unknown expert criterion {criterion!r}; use one of {EXPERT_CRITERIA}")
    return criterion


def lowest(scores: torch.Tensor, count: int) -> list[int]:
    """The indices of the ``count`` lowest scores (ties broken by index)."""
    order = sorted(range(len(scores)), key=lambda i: (float(scores[i]), i))
    return sorted(order[:count])


def expert_scores(gm: fx.GraphModule, found: Experts, criterion: str, calibration: Any = None,
                  seed: int = 0) -> dict[str, torch.Tensor]:
    """{MoE layer name: one score per expert} (higher is kept)."""
    check_expert_criterion(criterion)
    if criterion in CALIBRATED and calibration is None:
        raise CalibrationError(f"expert criterion {criterion!r} reads calibration data: pass batches, or use "
                               f"'weight-norm'")
    return EXPERT_CRITERION_RECORDS[criterion](gm, found, calibration, seed)


def _weight_norm(gm: fx.GraphModule, found: Experts, calibration: Any, seed: int) -> dict[str, torch.Tensor]:
    return {layer.name: torch.stack([_norm(gm, layer, e) for e in range(layer.num_experts)])
            for layer in found.layers}


def _norm(gm: fx.GraphModule, layer: MoELayer, expert: int) -> torch.Tensor:
    total = torch.zeros((), dtype=torch.float64)
    for key, index in layer.expert_tensors(expert).items():
        value = attribute(gm, key).detach()
        total += (value if index is None else value[index]).double().pow(2).sum().cpu()
    return total.sqrt()


def _random(gm: fx.GraphModule, found: Experts, calibration: Any, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {layer.name: torch.rand(layer.num_experts, generator=generator) for layer in found.layers}


def _frequency(gm: fx.GraphModule, found: Experts, calibration: Any, seed: int) -> dict[str, torch.Tensor]:
    return {name: sums[:, 0] for name, sums in _routed(gm, found, calibration, reap=False).items()}


def _reap(gm: fx.GraphModule, found: Experts, calibration: Any, seed: int) -> dict[str, torch.Tensor]:
    unread = [layer.name for layer in found.layers if not layer.lanes and not layer.weighted]
    if unread:
        raise InvalidOptionError(f"expert criterion 'reap' reads each expert's output, which the stacked experts "
                                 f"of MoE layers {unread[:3]} do not expose in the graph (no rows sorted by "
                                 f"expert): use 'frequency' or 'weight-norm'")
    return {name: sums[:, 1] / sums[:, 0].clamp(min=1) for name, sums in _routed(gm, found, calibration, True).items()}


def _routed(gm: fx.GraphModule, found: Experts, calibration: Any, reap: bool) -> dict[str, torch.Tensor]:
    """Per layer and expert: the tokens routed to it, and (``reap``) the summed norms of its contribution."""
    sums = {layer.name: torch.zeros(layer.num_experts, 2, dtype=torch.float64) for layer in found.layers}
    sites: dict[str, tuple[MoELayer, Optional[int]]] = {}
    for layer in found.layers:
        if not layer.ids:
            raise InvalidOptionError(f"MoE layer {layer.name!r}: its top-k's indices are not read by index")
        sites[layer.ids] = (layer, None)
        if reap:
            sites.update({lane.contribution: (layer, lane.index) for lane in layer.lanes})
            if layer.weighted:
                sites.update({layer.sorted_ids: (layer, -1), layer.weighted: (layer, -2)})
    held: dict[str, torch.Tensor] = {}

    def observe(index: int, node: fx.Node, value: torch.Tensor, mask: Optional[torch.Tensor]) -> None:
        layer, expert = sites[node.name]
        if expert == -1:  # the sorted ids come first: held for the rows that follow
            held[layer.name] = value.detach().reshape(-1)
        elif expert == -2:
            _add_sorted(sums[layer.name], held.pop(layer.name), value, node.name, index, mask)
        elif expert is None:
            real = token_rows(mask, value, value.dim() - 1, node.name, index)
            ids = value.reshape(-1, value.shape[-1]) if real is None else value.reshape(-1, value.shape[-1])[real]
            sums[layer.name][:, 0] += torch.bincount(ids.flatten().cpu(), minlength=layer.num_experts).double()
        else:
            if mask is not None:
                raise CalibrationError(f"calibration batch {index} is padded, and expert criterion 'reap' reads "
                                       f"gathered token rows ({node.name!r}): pass unpadded batches")
            rows = value.detach().reshape(-1, value.shape[-1]).double().norm(dim=-1)
            sums[layer.name][expert, 1] += float(rows.sum())

    run_batches(gm, calibration, set(sites), observe, with_mask=True)
    return sums


def _add_sorted(sums: torch.Tensor, ids: torch.Tensor, rows: torch.Tensor, name: str, index: int,
                mask: Optional[torch.Tensor]) -> None:
    """Add each row's norm to its expert's REAP sum (rows in the order of the sorted ids)."""
    if mask is not None:
        raise CalibrationError(f"calibration batch {index} is padded, and expert criterion 'reap' reads "
                               f"rows sorted by expert ({name!r}): pass unpadded batches")
    if rows.shape[0] != ids.numel():
        raise CalibrationError(f"calibration batch {index}: {name!r} has {rows.shape[0]} rows for "
                               f"{ids.numel()} routed tokens; its rows are not one per routed token")
    norms = rows.detach().reshape(ids.numel(), -1).double().norm(dim=-1).cpu()
    sums[:, 1].index_add_(0, ids.cpu().long(), norms)


#: Each expert criterion (named in :data:`fxprune.options.EXPERT_CRITERIA`) as ``(gm, experts, calibration,
#: seed) -> {layer: one score per expert}``.
EXPERT_CRITERION_RECORDS = keyed_by(EXPERT_CRITERIA, {"reap": _reap, "frequency": _frequency,
                                                      "weight-norm": _weight_norm, "random": _random},
                                    "expert criteria")

__all__ = ["EXPERT_CRITERIA", "CALIBRATED", "check_expert_criterion", "lowest", "expert_scores"]
