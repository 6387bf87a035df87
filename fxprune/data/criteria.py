"""Score: importance functions are pure, ``(group, tensors[, evidence]) -> one score per unit``.

Every criterion is one :class:`CriterionSpec` record in :data:`CRITERION_SPECS`: its name, what it
reads (weights, activations or gradients), how its evidence is gathered and how a group is scored.
Adding a criterion is one record and its tests; the name lists below are read from the table.

Weight criteria read the group's *producer* members (a conv's output filters, an LSTM unit's gate
rows); a unit spread over several positions (a flattened channel, a shuffled pair) sums them, and
members are reduced with ``mean`` (default), ``sum`` or ``max``. Lower scores are pruned first.

- ``l1``, ``l2``, ``fpgm``, ``bn_scale``, ``random``: producer weights only.
- ``group_magnitude``: every member of the group — producer rows, consumer input columns, norm
  scales — each ``Σ w²`` per unit, averaged over members (Torch-Pruning's ``GroupMagnitudeImportance``).
- Data-aware, from calibration statistics (:mod:`fxprune.data.calibration`): ``activation`` (mean ``|x|``
  of the unit at its consumers' inputs), ``wanda`` (``Σ |W_ij| · ‖X_j‖₂`` over the consumer columns
  of the unit: structured Wanda), ``flap`` (FLAP's fluctuation: ``Var(X_j) · ‖W_:j‖²``), ``energy``
  (``Σ‖W_u x_u‖²``: the unit's output energy at its consumers, with the cross terms of a unit of several
  columns — a whole head group at ``o_proj`` — from the consumer's Gram matrix: what removing the
  unit takes from the consumer's output; measured on a real LLM's head groups, ``benchmarks/bench_llm.py``).
- Gradient-based, over the whole calibration set: ``taylor`` (``Σ |w · ∂L/∂w|`` with the gradient
  accumulated over all batches; ``batch=`` still gives the one-batch form) and ``hessian`` (``Σ w² ·
  F`` with ``F`` the diagonal empirical Fisher, per-sample gradients from ``torch.func.vmap``).

A group whose units reach no conv/linear consumer (attention queries and keys) has no consumer
columns: ``wanda`` and ``flap`` then read its producers' outputs and rows instead.

>>> fxprune.prune(model, (x,), sparsity=0.5, criterion="fpgm")          # doctest: +SKIP
>>> fxprune.prune(model, (x,), criterion="wanda", calibration=loader)   # doctest: +SKIP
>>> fxprune.prune(model, (x,), sparsity=0.5, criterion=my_fn)           # my_fn(group, tensors) -> scores
"""
from __future__ import annotations

import functools
import math
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Union

import torch

from fxprune.core.analysis import Analysis
from fxprune.core.groups import Group
from fxprune.errors import CalibrationError, InvalidOptionError
from fxprune.options import DEFAULT_CRITERION, REDUCTIONS  # noqa: F401  (re-exported: declared once, in the options module)
from fxprune.progress import progress_bar

Criterion = Union[str, Callable[..., torch.Tensor]]
#: What a criterion reads besides nothing: the one vocabulary of :attr:`CriterionSpec.reads`.
READS = ("weights", "activations", "gradients")


@dataclass(frozen=True)
class Evidence:
    """What a data-aware criterion reads besides weights (see :func:`gather_evidence`)."""

    gradients: Optional[dict] = None
    """``taylor``: ``∂L/∂w`` summed over batches; ``hessian``: ``Σ (∂l_i/∂w)²`` over samples."""
    statistics: Any = None
    """:class:`fxprune.data.calibration.Statistics` for ``activation``, ``wanda`` and ``flap``."""


@dataclass(frozen=True)
class CriterionSpec:
    """One importance criterion, declared once.

    >>> CRITERION_SPECS["wanda"].reads
    'activations'
    """

    name: str
    """The name the API, the passes and the CLI accept."""
    reads: str
    """``"weights"``, ``"activations"`` (needs ``calibration=``) or ``"gradients"`` (needs ``calibration=``
    and ``loss_fn=``)."""
    doc: str
    """One line for ``--help`` and the docs."""
    score: Callable[..., torch.Tensor]
    """``(analysis, group, evidence, reduce, seed, name) -> float64 scores, one per unit``."""
    gather: Optional[Callable[..., Evidence]] = None
    """``(analysis, calibration, loss_fn, batch, progress, groups) -> Evidence`` (``groups``: the groups to
    be scored, ``None`` for all); ``None``: weights only."""
    one_batch: bool = False
    """``batch=(inputs, target)`` may stand in for ``calibration=`` (``taylor``'s one-batch form)."""
    grams: Optional[Callable[..., list]] = None
    """``(analysis, groups=None) -> Gram sites`` whose input Gram matrices the score reads beside the moments (gathered
    in memory by :attr:`gather`, from disk by :mod:`fxprune.hf.layerwise`)."""

    def check_data(self, calibration: Any, loss_fn: Optional[Callable], batch: Optional[tuple]) -> None:
        """A data-aware criterion without its data is an error naming the missing option."""
        if self.reads == "activations" and calibration is None:
            raise InvalidOptionError(f"criterion {self.name!r} reads activations: it needs calibration=<batches> "
                                     f"(a DataLoader, a list of tensors, or fxprune.Calibration(...))")
        if self.reads != "gradients" or (loss_fn is not None and (calibration is not None or
                                                                  (self.one_batch and batch is not None))):
            return
        missing = [n for n, v in (("calibration", calibration), ("loss_fn", loss_fn)) if v is None]
        raise InvalidOptionError(f"criterion {self.name!r} needs {' and '.join(missing)}: "
                                 f"calibration=<batches of (inputs, target)> and loss_fn=(output, "
                                 f"target) -> loss" + (" (or batch=(inputs, target) for one batch)"
                                                       if self.one_batch else ""))


def _named(reads: str) -> tuple[str, ...]:
    return tuple(name for name, spec in CRITERION_SPECS.items() if spec.reads == reads)


def check_criterion(criterion: Any, reduce: str = "mean") -> None:
    if not callable(criterion) and criterion not in CRITERIA:
        raise InvalidOptionError(f"unknown criterion {criterion!r}; expected one of {CRITERIA} or a "
                                 f"callable (group, tensors) -> scores")
    if reduce not in REDUCTIONS:
        raise InvalidOptionError(f"unknown reduce {reduce!r}; expected one of {REDUCTIONS}")


def check_data(criterion: Any, calibration: Any, loss_fn: Optional[Callable], batch: Optional[tuple]) -> None:
    """A data-aware criterion without its data is an error naming the missing option (a callable
    or an unknown name needs nothing here: :func:`check_criterion` judges names)."""
    spec = CRITERION_SPECS.get(criterion) if isinstance(criterion, str) else None
    if spec is not None:
        spec.check_data(calibration, loss_fn, batch)


def gather_evidence(analysis: Analysis, criterion: Any, calibration: Any = None,
                    loss_fn: Optional[Callable] = None, batch: Optional[tuple] = None,
                    progress: bool = False, groups: Optional[Sequence[Group]] = None) -> Evidence:
    """Run the calibration data through ``analysis.gm`` for what ``criterion`` reads (nothing for a
    weight criterion); for scoring ``groups`` only, when given (activations are read where their units are)."""
    check_data(criterion, calibration, loss_fn, batch)
    spec = CRITERION_SPECS.get(criterion) if isinstance(criterion, str) else None
    if spec is None or spec.gather is None:
        return Evidence()
    return spec.gather(analysis, calibration, loss_fn, batch, progress, groups)


def score_groups(analysis: Analysis, groups: tuple[Group, ...], criterion: Criterion,
                 reduce: str = "mean", seed: int = 0, gradients: Optional[dict] = None,
                 evidence: Optional[Evidence] = None) -> dict[str, torch.Tensor]:
    """One float64 score per unit of every prunable group, keyed by group name."""
    evidence = evidence if evidence is not None else Evidence(gradients=gradients)
    scores = {}
    for group in groups:
        if group.prunable:
            scores[group.name] = score_group(analysis, group, criterion, reduce, seed, evidence=evidence)
    return scores


def score_group(analysis: Analysis, group: Group, criterion: Criterion, reduce: str = "mean",
                seed: int = 0, gradients: Optional[dict] = None,
                evidence: Optional[Evidence] = None) -> torch.Tensor:
    evidence = evidence if evidence is not None else Evidence(gradients=gradients)
    if callable(criterion):
        return _user_scores(analysis, group, criterion)
    spec = CRITERION_SPECS.get(criterion)
    if spec is None:
        raise InvalidOptionError(f"unknown criterion {criterion!r}; expected one of {CRITERIA}")
    return spec.score(analysis, group, evidence, reduce, seed, spec.name)


def _user_scores(analysis: Analysis, group: Group, criterion: Callable) -> torch.Tensor:
    tensors = {m.key: analysis.tensor(m.key) for m in group.members}
    scores = torch.as_tensor(criterion(group, tensors), dtype=torch.float64)
    if scores.shape != (group.size,):
        raise InvalidOptionError(f"criterion {getattr(criterion, '__name__', criterion)!r} returned "
                                 f"shape {tuple(scores.shape)} for group {group.name!r}; expected ({group.size},)")
    return scores


# --- group scorers: how a record scores a group -----------------------------------------------------
def _random_scores(analysis: Analysis, group: Group, evidence: Evidence, reduce: str, seed: int,
                   name: str) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed + zlib.crc32(group.name.encode()))
    return torch.rand(group.size, generator=gen, dtype=torch.float64)


def _by_members(members: Callable[[Analysis, Group], list], position: Callable[..., torch.Tensor]
                ) -> Callable[..., torch.Tensor]:
    """A group scorer that scores each of ``members(analysis, group)`` position by position with
    ``position(analysis, member, evidence, name)``, sums positions into units and reduces members."""
    return functools.partial(_member_reduced, members, position)


def _member_reduced(members: Callable, position: Callable, analysis: Analysis, group: Group,
                    evidence: Evidence, reduce: str, seed: int, name: str) -> torch.Tensor:
    lookup = _unit_lookup(analysis, group)
    per_member = [_to_units(position(analysis, m, evidence, name).cpu(),
                            _unit_index(analysis, lookup, m.key, m.dim), group.size)
                  for m in members(analysis, group)]
    return _reduce(per_member, reduce, group.size)


# --- which members a criterion reads ----------------------------------------------------------------
def _producers(analysis: Analysis, group: Group) -> list:
    return [m for m in group.members if m.producer]


def _norm_scales(analysis: Analysis, group: Group) -> list:
    """``bn_scale``: the group's norm scales (1-d weights outside its producers), else its producers."""
    scales = [m for m in group.members if not m.producer and m.key.endswith(".weight")
              and analysis.tensor(m.key).dim() == 1]
    return scales or _producers(analysis, group)


def _weights(analysis: Analysis, group: Group) -> list:
    """``group_magnitude``: every weight member; a group of buffers only: its producers."""
    return [m for m in group.members if _is_weight(analysis, m.key)] or _producers(analysis, group)


def _is_weight(analysis: Analysis, key: str) -> bool:
    """A parameter that multiplies (a conv/linear/embedding weight, a norm scale), not a bias or a
    buffer such as BatchNorm's running statistics."""
    tensor = analysis.tensor(key)
    if not isinstance(tensor, torch.nn.Parameter) or not tensor.is_floating_point():
        return False
    return tensor.dim() >= 2 or key.rsplit(".", 1)[-1] == "weight"


# --- per-position scores of one member --------------------------------------------------------------
def _norm_positions(order: int, analysis: Analysis, member: Any, evidence: Evidence, name: str) -> torch.Tensor:
    """The ``order``-norm of each slice (no copy: reduced in place)."""
    return _slice_norms(analysis.tensor(member.key).detach(), member.dim, order)


def _squared_positions(analysis: Analysis, member: Any, evidence: Evidence, name: str) -> torch.Tensor:
    """``Σ w²`` per slice."""
    position = _slice_norms(analysis.tensor(member.key).detach(), member.dim, 2)
    return position * position


def _fpgm_positions(analysis: Analysis, member: Any, evidence: Evidence, name: str) -> torch.Tensor:
    # distance to all other filters: the ones nearest the geometric median are the most replaceable
    rows = _rows(analysis, member.key, member.dim).double()
    return torch.cdist(rows[None], rows[None])[0].sum(1)


def _taylor_positions(analysis: Analysis, member: Any, evidence: Evidence, name: str) -> torch.Tensor:
    """``Σ |w · ∂L/∂w|`` per row."""
    rows, grad = _rows_and_gradient(analysis, member, evidence, name)
    return torch.linalg.vector_norm(rows * grad, ord=1, dim=1).double()


def _hessian_positions(analysis: Analysis, member: Any, evidence: Evidence, name: str) -> torch.Tensor:
    """``Σ w² · F`` per row."""
    rows, fisher = _rows_and_gradient(analysis, member, evidence, name)
    return torch.linalg.vector_norm(rows * rows * fisher, ord=1, dim=1).double()


def _rows_and_gradient(analysis: Analysis, member: Any, evidence: Evidence, name: str
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    gradients = evidence.gradients
    if gradients is None or member.key not in gradients:
        raise InvalidOptionError(f"criterion {name!r} needs loss_fn and calibration data")
    rows = _rows(analysis, member.key, member.dim)
    grad = gradients[member.key].detach().to(rows.dtype).movedim(member.dim, 0).reshape(rows.shape)
    return rows, grad


def _unit_lookup(analysis: Analysis, group: Group) -> dict[int, int]:
    """Class root -> index of the unit in ``group.units``."""
    return {u: i for i, u in enumerate(group.units)}


def _unit_index(analysis: Analysis, lookup: dict[int, int], key: str, dim: int) -> torch.Tensor:
    """For each position of a member dim, the index of its unit in the group (-1: other group)."""
    return _index_of(analysis, lookup, analysis.params[key][dim])


def _index_of(analysis: Analysis, lookup: dict[int, int], ids: torch.Tensor) -> torch.Tensor:
    roots = analysis.solution.root[ids].tolist()
    return torch.tensor([lookup.get(r, -1) for r in roots], dtype=torch.long)


def _slice_norms(tensor: torch.Tensor, dim: int, order: int) -> torch.Tensor:
    """The ``order``-norm (1 or 2) of each slice of ``tensor`` along ``dim`` (float64)."""
    sums = _slice_sums(tensor, dim, order)
    return sums if order == 1 else sums.sqrt()


def _slice_sums(tensor: torch.Tensor, dim: int, order: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``Σ|w|`` (order 1) or ``Σw²`` (order 2) of each slice of ``tensor`` along ``dim``, float64, its
    chunks reduced in ``dtype`` (at least). Viewed as (outer, dim, inner) and summed inner first:
    contiguous reductions, many times faster on the CPU than one reduction over the scattered dims of a
    consumer's input columns; a chunk at a time, so a bf16 embedding is never copied whole as fp32."""
    shape = tensor.shape
    blocks = tensor.reshape(math.prod(shape[:dim]), shape[dim], math.prod(shape[dim + 1:]))
    rows = max(1, _CHUNK // max(1, blocks.shape[1] * blocks.shape[2]))
    total = torch.zeros(shape[dim], dtype=torch.float64)
    for start in range(0, max(1, blocks.shape[0]), rows):
        chunk = blocks[start:start + rows]
        chunk = chunk if chunk.dtype in (dtype, torch.float64) else chunk.to(dtype)
        power = chunk.abs() if order == 1 else chunk.square()
        total += power.sum(2).sum(0).double().cpu()
    return total


#: Elements of a tensor reduced at once by :func:`_slice_sums` (32 MB in float64, the data criteria's
#: dtype: with its square beside it, a transient that stays small next to a bf16 model's weights).
_CHUNK = 1 << 22


def _rows(analysis: Analysis, key: str, dim: int) -> torch.Tensor:
    """The tensor as one row per position of ``dim``."""
    tensor = analysis.tensor(key).detach()
    tensor = tensor if tensor.dtype in (torch.float32, torch.float64) else tensor.float()
    return tensor.movedim(dim, 0).reshape(tensor.shape[dim], -1)


def _to_units(position: torch.Tensor, index: torch.Tensor, size: int) -> torch.Tensor:
    """Sum per-position scores into their units (positions of other groups, index -1, are left out)."""
    valid = index >= 0
    out = torch.zeros(size, dtype=torch.float64)
    out.index_add_(0, index[valid], position.double()[valid])
    return out


# --- activation-aware criteria --------------------------------------------------------------------
def _activation_scores(analysis: Analysis, group: Group, evidence: Evidence, reduce: str, seed: int,
                       name: str) -> torch.Tensor:
    """``activation``: mean ``|x|`` of the unit where its consumers read it (else at its producers)."""
    statistics, lookup = _statistics(evidence, name), _unit_lookup(analysis, group)
    consumers = _watched_consumers(analysis, lookup, statistics)
    sites = [(c.input, c.channel_dim) for c in consumers] or _producer_sites(analysis, group, statistics)
    return _mean_abs(analysis, lookup, statistics, dict.fromkeys(sites), group.size)


def _weighted_activation_scores(position: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """A group scorer that weighs each consumer column (or producer row) of the unit by its watched
    activation with ``position(weight, dim, statistics, node)``: ``wanda`` and ``flap``."""
    return functools.partial(_consumer_scores, position)


def _consumer_scores(position: Callable, analysis: Analysis, group: Group, evidence: Evidence, reduce: str,
                     seed: int, name: str) -> torch.Tensor:
    statistics, lookup = _statistics(evidence, name), _unit_lookup(analysis, group)
    consumers = _watched_consumers(analysis, lookup, statistics)
    if consumers:
        per = [_consumer_score(analysis, lookup, statistics, c.weight, c.in_dim, c.input, position, group.size)
               for c in consumers]
    else:  # no conv/linear reads these units (attention queries/keys): their producers' outputs
        per = [_consumer_score(analysis, lookup, statistics, m.key, m.dim, node, position, group.size)
               for m, node in _producer_members(analysis, group, statistics)]
    return _reduce(per, reduce, group.size)


def _statistics(evidence: Evidence, name: str) -> Any:
    if evidence.statistics is None:
        raise InvalidOptionError(f"criterion {name!r} needs calibration data")
    return evidence.statistics


def _watched_consumers(analysis: Analysis, lookup: dict[int, int], statistics: Any) -> list:
    return [c for c in analysis.weighted_consumers if _in_group(analysis, lookup, c.weight, c.in_dim)
            and _site_matches(statistics, c.input, c.channel_dim)]


def _in_group(analysis: Analysis, lookup: dict[int, int], key: str, dim: int) -> bool:
    return bool((_unit_index(analysis, lookup, key, dim) >= 0).any())


def _site_matches(statistics: Any, node: str, dim: int) -> bool:
    site = statistics.sites.get(node)
    return site is not None and site.dim == dim


def _producer_members(analysis: Analysis, group: Group, statistics: Any) -> list[tuple[Any, str]]:
    """(producer member, its output node) for producers whose output was watched."""
    out = []
    for producer in analysis.producers:
        member = next((m for m in group.members if m.producer and m.key == producer.key
                       and m.dim == producer.dim), None)
        if member is not None and producer.node in statistics.sites:
            out.append((member, producer.node))
    return out


def _producer_sites(analysis: Analysis, group: Group, statistics: Any) -> list[tuple[str, int]]:
    return [(node, statistics.sites[node].dim) for _, node in _producer_members(analysis, group, statistics)]


def _site_index(analysis: Analysis, lookup: dict[int, int], node: str, dim: int) -> torch.Tensor:
    """For each position of ``node``'s output ``dim``, the index of its unit (-1: other group)."""
    nodes = {n.name: n for n in analysis.gm.graph.nodes}
    return _index_of(analysis, lookup, analysis.env[nodes[node]][dim])


def _mean_abs(analysis: Analysis, lookup: dict[int, int], statistics: Any, sites: dict, size: int
              ) -> torch.Tensor:
    """Mean |x| per unit over every element of its positions at ``sites``."""
    total, count = torch.zeros(size, dtype=torch.float64), torch.zeros(size, dtype=torch.float64)
    for node, dim in sites:
        index = _site_index(analysis, lookup, node, dim)
        total += _to_units(statistics.sums[f"{node}:abs"], index, size)
        count += _to_units(statistics.count(node).expand(index.numel()), index, size)
    return total / count.clamp_min(1)


def _consumer_score(analysis: Analysis, lookup: dict[int, int], statistics: Any, key: str, dim: int,
                    node: str, position: Callable, size: int) -> torch.Tensor:
    """``position``'s score per position of ``key``'s ``dim``, read against the watched activation of
    ``node`` (the consumer's input, or the producer's output)."""
    weight = analysis.tensor(key).detach()  # reduced in chunks: an LM head is never copied whole in fp64
    return _to_units(position(weight, dim, statistics, node), _unit_index(analysis, lookup, key, dim), size)


def _wanda_positions(weight: torch.Tensor, dim: int, statistics: Any, node: str) -> torch.Tensor:
    """``Σ|W| · ‖X‖₂``"""
    return _slice_sums(weight, dim, 1, torch.float64) * statistics.l2(node)


def _flap_positions(weight: torch.Tensor, dim: int, statistics: Any, node: str) -> torch.Tensor:
    """``‖W‖² · Var(X)``"""
    return _slice_sums(weight, dim, 2, torch.float64) * statistics.var(node)


def _energy_positions(weight: torch.Tensor, dim: int, statistics: Any, node: str) -> torch.Tensor:
    """``‖W_:j‖² · Σx_j²`` (the diagonal of ``energy``)"""
    return _slice_sums(weight, dim, 2, torch.float64) * statistics.sums[f"{node}:sq"]


def _energy_scores(analysis: Analysis, group: Group, evidence: Evidence, reduce: str, seed: int,
                   name: str) -> torch.Tensor:
    """``energy``: ``Σ_rows ‖W_u x_u‖²``, the squared norm of the unit's contribution to each consumer's
    output over the calibration data (its producers' outputs where no conv/linear reads it). A unit of
    several columns (a whole attention head group at ``o_proj``) includes their cross terms from the
    consumer's Gram matrix: ``tr(W_u G_uu W_uᵀ)``, the exact output error of removing it there."""
    statistics, lookup = _statistics(evidence, name), _unit_lookup(analysis, group)
    consumers = _watched_consumers(analysis, lookup, statistics)
    if not consumers:
        return _consumer_scores(_energy_positions, analysis, group, evidence, reduce, seed, name)
    per = [_gram_energy(analysis, lookup, statistics, c, group.size) if c.node in statistics.grams else
           _consumer_score(analysis, lookup, statistics, c.weight, c.in_dim, c.input, _energy_positions, group.size)
           for c in consumers]
    return _reduce(per, reduce, group.size)


def _gram_energy(analysis: Analysis, lookup: dict[int, int], statistics: Any, consumer: Any, size: int
                 ) -> torch.Tensor:
    """Per unit, ``Σ_{i,j ∈ u} (WᵀW ∘ G)_ij`` over the consumer's input columns ``i, j`` of the unit."""
    index = _unit_index(analysis, lookup, consumer.weight, consumer.in_dim)
    cols = (index >= 0).nonzero().flatten()
    weight = analysis.tensor(consumer.weight).detach().double().cpu()[:, cols]
    gram = statistics.gram(consumer.node)[cols][:, cols]
    onehot = torch.nn.functional.one_hot(index[cols], size).double()
    return (((weight.T @ weight) * gram) @ onehot * onehot).sum(0)


def _spans_columns(analysis: Analysis, consumer: Any) -> bool:
    """A linear consumer some of whose units are several input columns (a head group at ``o_proj``)."""
    if analysis.tensor(consumer.weight).dim() != 2 or consumer.in_dim != 1:
        return False
    roots = analysis.solution.root[analysis.params[consumer.weight][consumer.in_dim]]
    return roots.unique().numel() < roots.numel()


def _reduce(per_member: list[torch.Tensor], reduce: str, size: int) -> torch.Tensor:
    if not per_member:
        return torch.zeros(size, dtype=torch.float64)
    stacked = torch.stack(per_member)
    if reduce == "sum":
        return stacked.sum(0)
    if reduce == "max":
        return stacked.max(0).values
    return stacked.mean(0)


# --- gathering evidence: how a record reads the calibration data -----------------------------------
def _gather_statistics(analysis: Analysis, calibration: Any, loss_fn: Optional[Callable], batch: Optional[tuple],
                       progress: bool, groups: Optional[Sequence[Group]] = None) -> Evidence:
    from fxprune.data import calibration as calib  # the calibration stage imports the capture stack lazily
    return Evidence(statistics=calib.collect(analysis.gm, calibration, calib.calibration_sites(analysis, groups),
                                             progress=progress))


def _energy_grams(analysis: Analysis, groups: Optional[Sequence[Group]] = None) -> list:
    """The Gram sites of every linear consumer whose units span several columns (of ``groups``' free
    units only, when given)."""
    from fxprune.data import calibration as calib
    free = calib.free_classes(analysis, groups)
    nodes = [c.node for c in analysis.weighted_consumers if _spans_columns(analysis, c)
             and calib.any_free(analysis, analysis.params[c.weight][c.in_dim], free)]
    return calib.gram_sites(analysis, nodes) if nodes else []


def _gather_energy(analysis: Analysis, calibration: Any, loss_fn: Optional[Callable], batch: Optional[tuple],
                   progress: bool, groups: Optional[Sequence[Group]] = None) -> Evidence:
    """Statistics, with the input Gram matrix of every linear consumer whose units span columns."""
    from fxprune.data import calibration as calib
    return Evidence(statistics=calib.collect(analysis.gm, calibration, calib.calibration_sites(analysis, groups),
                                             _energy_grams(analysis, groups), progress=progress))


def _gather_gradients(analysis: Analysis, calibration: Any, loss_fn: Optional[Callable], batch: Optional[tuple],
                      progress: bool, groups: Optional[Sequence[Group]] = None) -> Evidence:
    """``∂L/∂w`` summed over the calibration set, or on ``batch`` alone when there is no set (of every
    parameter: one backward pass gives them all, whatever ``groups`` are scored)."""
    if calibration is None:
        return Evidence(gradients=taylor_gradients(analysis.gm, loss_fn, batch))
    return Evidence(gradients=accumulated_gradients(analysis.gm, loss_fn, calibration, progress))


def _gather_fisher(analysis: Analysis, calibration: Any, loss_fn: Optional[Callable], batch: Optional[tuple],
                   progress: bool, groups: Optional[Sequence[Group]] = None) -> Evidence:
    return Evidence(gradients=fisher_diagonal(analysis.gm, loss_fn, calibration, progress))


# --- gradients ------------------------------------------------------------------------------------
def _functional(gm: torch.nn.Module, loss_fn: Callable) -> tuple[dict, Callable]:
    """The parameters of ``gm`` and ``loss(params, inputs, target)`` through ``functional_call``."""
    params = {k: v.detach() for k, v in gm.named_parameters()}
    buffers = {k: v for k, v in gm.named_buffers()}

    def loss(p: dict, inputs: tuple, target: Any) -> torch.Tensor:
        return loss_fn(torch.func.functional_call(gm, {**p, **buffers}, inputs), target)

    return params, loss


def taylor_gradients(gm: torch.nn.Module, loss_fn: Callable, batch: tuple) -> dict[str, torch.Tensor]:
    """∂loss/∂w for every parameter on one batch, with ``torch.func.grad`` over ``functional_call``."""
    params, loss = _functional(gm, loss_fn)
    inputs, target = batch
    return torch.func.grad(loss)(params, (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs), target)


def accumulated_gradients(gm: torch.nn.Module, loss_fn: Callable, calibration: Any,
                          progress: bool = False) -> dict[str, torch.Tensor]:
    """``Σ_batches ∂L_b/∂w`` over the calibration set (and over ranks), in eval mode."""
    params, loss = _functional(gm, loss_fn)
    grad = torch.func.grad(loss)
    return _sum_over_batches(gm, calibration, lambda inputs, target: grad(params, inputs, target), progress)


def fisher_diagonal(gm: torch.nn.Module, loss_fn: Callable, calibration: Any, progress: bool = False,
                    chunk_size: int = 16) -> dict[str, torch.Tensor]:
    """The diagonal empirical Fisher ``Σ_i (∂l_i/∂w)²``: per-sample gradients with ``torch.func.vmap``
    (``chunk_size`` samples at a time bound the memory). Each sample runs as a batch of one, or, in a
    graph specialised to batch size ``b``, as ``b`` copies of itself (an eval-mode model treats rows
    independently, so a mean loss over the copies is the sample's own loss)."""
    from fxprune.data.calibration import fixed_batch_size
    copies = fixed_batch_size(gm) or 1
    params, loss = _functional(gm, loss_fn)

    def tile(x: torch.Tensor) -> torch.Tensor:
        return x.unsqueeze(0).expand(copies, *x.shape)

    def sample_loss(p: dict, inputs: tuple, target: Any) -> torch.Tensor:
        return loss(p, tuple(tile(x) for x in inputs), tile(target) if isinstance(target, torch.Tensor) else target)

    def squared(inputs: tuple, target: Any) -> dict:
        in_dims = (None, 0, 0 if isinstance(target, torch.Tensor) else None)
        per_sample = torch.func.vmap(torch.func.grad(sample_loss), in_dims=in_dims,
                                     chunk_size=chunk_size)(params, inputs, target)
        return {k: g.pow(2).sum(0) for k, g in per_sample.items()}

    return _sum_over_batches(gm, calibration, squared, progress, split=False)


def _sum_over_batches(gm: torch.nn.Module, calibration: Any, per_batch: Callable, progress: bool,
                      split: bool = True) -> dict[str, torch.Tensor]:
    from fxprune.data.calibration import Sums, as_calibration, check_batch, empty_error, eval_mode, \
        fixed_batch_size, is_distributed, placeholder_shapes, split_batch
    calibration = as_calibration(calibration)
    expected = placeholder_shapes(gm)
    sums, batches = Sums(), 0
    with eval_mode(gm):
        for index, inputs, target in progress_bar(calibration.pairs(len(expected), is_distributed()), progress,
                                                     desc="gradients", unit="batch"):
            check_batch(inputs, expected, index)
            chunks = split_batch(inputs + (target,), fixed_batch_size(gm) if split else None, index) \
                if isinstance(target, torch.Tensor) else [inputs + (target,)]
            for chunk in chunks:  # a graph specialised to a smaller batch: each chunk's share of it
                share = chunk[0].shape[0] / inputs[0].shape[0] if inputs[0].dim() else 1.0
                for key, value in _run_gradient(per_batch, chunk[:-1], chunk[-1], index).items():
                    sums.add(key, value * share if split else value)
            batches += 1
    sums.add(":batches", torch.tensor(float(batches)))
    for key, value in gm.named_parameters():  # every rank reduces the same names, even with no batch
        if key not in sums:
            sums.add(key, torch.zeros_like(value))
    sums.all_reduce()
    if sums[":batches"].item() == 0:
        raise empty_error(calibration.data)
    return {k: v for k, v in sums.values.items() if k != ":batches"}


def _run_gradient(per_batch: Callable, inputs: tuple, target: Any, index: int) -> dict:
    try:
        grads = per_batch(inputs, target)
    except (InvalidOptionError, CalibrationError):
        raise
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise CalibrationError(f"the model or loss_fn rejects calibration batch {index} (inputs of shapes "
                               f"{[tuple(x.shape) for x in inputs]}): {type(exc).__name__}: {first}") from exc
    for key, grad in grads.items():
        if not bool(grad.isfinite().all()):
            raise CalibrationError(f"calibration batch {index} gives a non-finite gradient for {key!r}")
    return grads


#: Every criterion, in the order the API, the passes and the CLI list them.
CRITERION_SPECS: dict[str, CriterionSpec] = {spec.name: spec for spec in (
    CriterionSpec("l1", "weights", "Σ|w| of each unit's producer slices",
                  _by_members(_producers, functools.partial(_norm_positions, 1))),
    CriterionSpec("l2", "weights", "‖w‖₂ of each unit's producer slices",
                  _by_members(_producers, functools.partial(_norm_positions, 2))),
    CriterionSpec("fpgm", "weights", "distance of each producer filter to the others (geometric median)",
                  _by_members(_producers, _fpgm_positions)),
    CriterionSpec("bn_scale", "weights", "|γ| of the group's norm scales (network slimming)",
                  _by_members(_norm_scales, functools.partial(_norm_positions, 1))),
    CriterionSpec("random", "weights", "uniform random, seeded by seed= and the group's name", _random_scores),
    CriterionSpec("group_magnitude", "weights", "Σw² per unit over every weight member of the group",
                  _by_members(_weights, _squared_positions)),
    CriterionSpec("activation", "activations", "mean |x| of the unit at its consumers' inputs",
                  _activation_scores, _gather_statistics),
    CriterionSpec("wanda", "activations", "Σ|W|·‖X‖₂ over the unit's consumer columns (structured Wanda)",
                  _weighted_activation_scores(_wanda_positions), _gather_statistics),
    CriterionSpec("flap", "activations", "Var(X)·‖W‖² over the unit's consumer columns (FLAP)",
                  _weighted_activation_scores(_flap_positions), _gather_statistics),
    CriterionSpec("energy", "activations", "‖W_u·X_u‖² of the unit's contribution to its consumers' outputs "
                  "(cross terms of a multi-column unit, a head group, from the consumer's Gram matrix)",
                  _energy_scores, _gather_energy, grams=_energy_grams),
    CriterionSpec("taylor", "gradients", "Σ|w·∂L/∂w| with the gradient summed over the calibration set",
                  _by_members(_producers, _taylor_positions), _gather_gradients, one_batch=True),
    CriterionSpec("hessian", "gradients", "Σw²·F with F the diagonal empirical Fisher",
                  _by_members(_producers, _hessian_positions), _gather_fisher),
)}
#: Every criterion by name: the one list the API, the passes and the CLI offer.
CRITERIA = tuple(CRITERION_SPECS)
#: Criteria that read weights only.
WEIGHT_CRITERIA = _named("weights")
#: Criteria that read calibration statistics (``calibration=`` required).
ACTIVATION_CRITERIA = _named("activations")
#: Criteria that read gradients of a loss (``loss_fn=`` and ``calibration=``; ``taylor`` also ``batch=``).
GRADIENT_CRITERIA = _named("gradients")
#: Criteria that need calibration data.
DATA_CRITERIA = ACTIVATION_CRITERIA + GRADIENT_CRITERIA
