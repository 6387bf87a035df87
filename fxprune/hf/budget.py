"""One budget instead of ratios: ``fxprune.hf.prune(model, inputs, target={"params": 0.8})``.

fxprune chooses how much depth (whole layers) and width (the MLP's ``intermediate_size``) to remove so
that the model keeps the asked fraction of its parameters, by trying a few mixes and keeping the one with
the lowest next-token loss on the calibration data: the parameters to remove are split between depth
and width in the shares :data:`MIXES` (all width, half and half, all depth), each share turned into a
layer count and an intermediate ratio from the parameter counts of one layer and of its MLP. The
achieved fraction and every mix tried are recorded in ``config.fxprune["budget"]``. A budget no mix can
reach (at most all layers but one, and 90% of the last one's MLP) is an ``InvalidOptionError`` naming
the smallest fraction reachable. ``target`` is an option of :class:`~fxprune.options.PruneOptions`,
checked there: only ``"params"`` is a budget today; ``"active_params"`` and ``"macs"`` are refused with
a typed error.

>>> smaller = fxprune.hf.prune(model, (ids,), target={"params": 0.8}, calibration=batches)  # doctest: +SKIP
>>> smaller.config.fxprune["budget"]["achieved"]                                          # doctest: +SKIP
0.801
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from fxprune.data.calibration import as_calibration
from fxprune.errors import InvalidOptionError, UnsupportedModelError
from fxprune.hf.depth import layer_list
from fxprune.options import BUDGETS, PruneOptions  # noqa: F401  (BUDGETS re-exported: declared there)

#: The share of the parameters to remove taken by depth, per mix tried.
MIXES = (0.0, 0.5, 1.0)
MAX_WIDTH = 0.9


@dataclass(frozen=True)
class Mix:
    """One way to meet the budget: ``layers`` removed, then ``width`` of each MLP's intermediate size."""

    depth_share: float
    layers: int
    width: float

    def sparsity(self, total_layers: int) -> dict[str, float]:
        out = {"num_hidden_layers": self.layers / total_layers} if self.layers else {}
        return {**out, "intermediate_size": self.width} if self.width > 0 else out


def check_target(target: Any) -> float:
    """The fraction a budget keeps (checked as the ``target`` option is: :class:`PruneOptions`)."""
    (fraction,) = PruneOptions(target=target).target.values()
    return float(fraction)


def _counts(model: Any) -> tuple[int, int, int, int]:
    """(total parameters, layers, one layer's parameters, that layer's MLP parameters)."""
    path, layers = layer_list(model)
    width = getattr(model.config, "intermediate_size", None)
    if not isinstance(width, int):
        raise UnsupportedModelError(f"{type(model).__name__}'s config has no intermediate_size: a budget mixes "
                                    f"layers with MLP width")
    first = model.get_submodule(f"{path}.0")
    layer = sum(p.numel() for p in first.parameters())
    mlp = sum(p.numel() for p in first.parameters() if width in p.shape)
    return model.num_parameters(), layers, layer, mlp


def mixes(model: Any, fraction: float) -> list[Mix]:
    """The feasible mixes for keeping ``fraction`` of the parameters (an error naming the floor if none)."""
    total, layers, layer, mlp = _counts(model)
    remove = (1 - fraction) * total
    out = []
    for share in MIXES:
        count = min(round(share * remove / layer), layers - 1)
        width = max(0.0, (remove - count * layer) / (mlp * (layers - count)))
        if width <= MAX_WIDTH:
            out.append(Mix(share, count, round(width, 4)))
    if not out:
        floor = (total - (layers - 1) * layer - MAX_WIDTH * mlp) / total
        raise InvalidOptionError(f"target params {fraction} cannot be met: the smallest model a mix of depth "
                                 f"and width reaches keeps {floor:.3f} of the parameters")
    unique = {(m.layers, m.width): m for m in reversed(out)}  # the same mix from two shares: tried once
    return sorted(unique.values(), key=lambda m: m.depth_share)


def prune_to_budget(model: Any, inputs: tuple, target: Any, calibration: Any,
                    prune: Callable[[Any], Any]) -> tuple[Any, dict[str, float]]:
    """Try every mix with ``prune(sparsity) -> HFPruneResult``; keep the lowest calibration loss.
    Returns that result and the sparsity it was pruned with."""
    fraction = check_target(target)
    _, layers, _, _ = _counts(model)
    batches = [inputs] if calibration is None else list(as_calibration(calibration).batches(len(inputs)))
    tried, best = [], None
    total = model.num_parameters()
    for mix in mixes(model, fraction):
        result = prune(mix.sparsity(layers))
        loss = next_token_loss(result.model, batches)
        kept = result.model.num_parameters() / total
        tried.append({"layers": mix.layers, "intermediate": mix.width, "params": round(kept, 4), "loss": loss})
        if best is None or loss < best[0]:
            best = (loss, result, kept, mix.sparsity(layers))
    _, result, kept, sparsity = best
    result.model.config.fxprune = {**result.model.config.fxprune,
                                   "budget": {"target": {"params": fraction}, "achieved": round(kept, 4),
                                              "tried": tried}}
    return result, sparsity


def next_token_loss(model: Any, batches: list[tuple]) -> float:
    """Mean next-token cross-entropy of a causal LM on ``batches`` of input ids."""
    losses = []
    with torch.no_grad():
        for inputs in batches:
            logits = model(*inputs, use_cache=False).logits
            ids = inputs[0]
            losses.append(float(F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())))
    return sum(losses) / len(losses)


__all__ = ["BUDGETS", "MIXES", "Mix", "check_target", "mixes", "prune_to_budget", "next_token_loss"]
