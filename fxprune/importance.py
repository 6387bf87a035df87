"""Score: importance functions are pure, ``(group, tensors[, batch]) -> one score per unit``.

Magnitude criteria read the group's *producer* members (a conv's output filters, an LSTM unit's gate
rows); a unit spread over several positions (a flattened channel, a shuffled pair) sums them, and
members are reduced with ``mean`` (default), ``sum`` or ``max``. Lower scores are pruned first.

>>> fxprune.prune(model, (x,), sparsity=0.5, criterion="fpgm")          # doctest: +SKIP
>>> fxprune.prune(model, (x,), sparsity=0.5, criterion=my_fn)           # my_fn(group, tensors) -> scores
"""
from __future__ import annotations

import zlib
from typing import Any, Callable, Optional, Union

import torch

from .analysis import Analysis
from .errors import InvalidOptionError
from .groups import Group

Criterion = Union[str, Callable[..., torch.Tensor]]
CRITERIA = ("l1", "l2", "fpgm", "bn_scale", "random", "taylor")
REDUCTIONS = ("mean", "sum", "max")


def check_criterion(criterion: Any, reduce: str = "mean") -> None:
    if not callable(criterion) and criterion not in CRITERIA:
        raise InvalidOptionError(f"unknown criterion {criterion!r}; expected one of {CRITERIA} or a "
                                 f"callable (group, tensors) -> scores")
    if reduce not in REDUCTIONS:
        raise InvalidOptionError(f"unknown reduce {reduce!r}; expected one of {REDUCTIONS}")


def score_groups(analysis: Analysis, groups: tuple[Group, ...], criterion: Criterion,
                 reduce: str = "mean", seed: int = 0, gradients: Optional[dict] = None
                 ) -> dict[str, torch.Tensor]:
    """One float64 score per unit of every prunable group, keyed by group name."""
    scores = {}
    for group in groups:
        if group.prunable:
            scores[group.name] = score_group(analysis, group, criterion, reduce, seed, gradients)
    return scores


def score_group(analysis: Analysis, group: Group, criterion: Criterion, reduce: str = "mean",
                seed: int = 0, gradients: Optional[dict] = None) -> torch.Tensor:
    if callable(criterion):
        tensors = {m.key: analysis.tensor(m.key) for m in group.members}
        scores = torch.as_tensor(criterion(group, tensors), dtype=torch.float64)
        if scores.shape != (group.size,):
            raise InvalidOptionError(f"criterion {getattr(criterion, '__name__', criterion)!r} returned "
                                     f"shape {tuple(scores.shape)} for group {group.name!r}; expected ({group.size},)")
        return scores
    if criterion == "random":
        gen = torch.Generator().manual_seed(seed + zlib.crc32(group.name.encode()))
        return torch.rand(group.size, generator=gen, dtype=torch.float64)
    members = _scored_members(analysis, group, criterion)
    lookup = _unit_lookup(analysis, group)
    per_member = [_member_scores(analysis, group, lookup, m, criterion, gradients) for m in members]
    return _reduce(per_member, reduce, group.size)


def _scored_members(analysis: Analysis, group: Group, criterion: str) -> list:
    if criterion == "bn_scale":
        scales = [m for m in group.members if not m.producer and m.key.endswith(".weight")
                  and analysis.tensor(m.key).dim() == 1]
        if scales:
            return scales
    return [m for m in group.members if m.producer]


def _unit_lookup(analysis: Analysis, group: Group) -> dict[int, int]:
    """Class root -> index of the unit in ``group.units``."""
    return {u: i for i, u in enumerate(group.units)}


def _unit_index(analysis: Analysis, lookup: dict[int, int], key: str, dim: int) -> torch.Tensor:
    """For each position of a member dim, the index of its unit in the group (-1: other group)."""
    roots = analysis.solution.root[analysis.params[key][dim]].tolist()
    return torch.tensor([lookup.get(r, -1) for r in roots], dtype=torch.long)


def _member_scores(analysis: Analysis, group: Group, lookup: dict[int, int], member: Any,
                   criterion: str, gradients: Optional[dict]) -> torch.Tensor:
    tensor = analysis.tensor(member.key).detach()
    tensor = tensor if tensor.dtype in (torch.float32, torch.float64) else tensor.float()
    rows = tensor.movedim(member.dim, 0).reshape(tensor.shape[member.dim], -1)
    if criterion == "taylor":
        if gradients is None or member.key not in gradients:
            raise InvalidOptionError("criterion 'taylor' needs loss_fn and batch")
        grad = gradients[member.key].detach().to(tensor.dtype)
        rows = rows * grad.movedim(member.dim, 0).reshape(rows.shape)
    position = _position_scores(rows, criterion).cpu()  # one score per row: small, and on the CPU
    index = _unit_index(analysis, lookup, member.key, member.dim)
    valid = index >= 0
    out = torch.zeros(group.size, dtype=torch.float64)
    out.index_add_(0, index[valid], position[valid])
    return out


def _position_scores(rows: torch.Tensor, criterion: str) -> torch.Tensor:
    if criterion in ("l1", "bn_scale", "taylor"):
        return torch.linalg.vector_norm(rows, ord=1, dim=1).double()
    if criterion == "l2":
        return torch.linalg.vector_norm(rows, ord=2, dim=1).double()
    if criterion == "fpgm":
        # distance to all other filters: the ones nearest the geometric median are the most replaceable
        rows = rows.double()
        return torch.cdist(rows[None], rows[None])[0].sum(1)
    raise InvalidOptionError(f"unknown criterion {criterion!r}")


def _reduce(per_member: list[torch.Tensor], reduce: str, size: int) -> torch.Tensor:
    if not per_member:
        return torch.zeros(size, dtype=torch.float64)
    stacked = torch.stack(per_member)
    if reduce == "sum":
        return stacked.sum(0)
    if reduce == "max":
        return stacked.max(0).values
    return stacked.mean(0)


def taylor_gradients(gm: torch.nn.Module, loss_fn: Callable, batch: tuple) -> dict[str, torch.Tensor]:
    """∂loss/∂w for every parameter, with ``torch.func.grad`` over ``functional_call``."""
    params = {k: v.detach() for k, v in gm.named_parameters()}
    buffers = {k: v for k, v in gm.named_buffers()}
    inputs, target = batch

    def loss(p: dict) -> torch.Tensor:
        out = torch.func.functional_call(gm, {**p, **buffers}, (inputs,) if isinstance(inputs, torch.Tensor) else inputs)
        return loss_fn(out, target)

    return torch.func.grad(loss)(params)
