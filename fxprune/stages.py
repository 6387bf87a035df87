"""The stages, composed once: capture -> match -> score -> select -> plan -> rewrite.

:func:`fxprune.prune`, the ``prune-channels`` and ``mask-channels`` passes and :mod:`fxprune.hf` run these
same functions in this order; each may stop after any stage (``mask-channels`` masks instead of
rewriting) or select in its own way (``fxprune.hf`` imposes one width per kind of layer), and every
stage runs its own checks, so no caller can skip one.

>>> options = PruneOptions(sparsity=0.5, capture="export")
>>> analysis = analyze(model, (x,), options)                         # doctest: +SKIP
>>> scores = score(analysis, options)                                # doctest: +SKIP
>>> drop, plan = choose(analysis, scores, options)                   # doctest: +SKIP
>>> gm = rewrite_graph(analysis, drop, (x,), options)                # doctest: +SKIP

Run-time data (calibration batches, a loss function, progress bars) is a :class:`RunData`, never an
option: a plan records what shaped it, not the data it was measured on.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
import torch.fx as fx

from fxprune.core.analysis import Analysis, AnalysisOptions, match
from fxprune.core.groups import Group
from fxprune.core.bias_folding import fold_biases
from fxprune.core.channels import Dropped
from fxprune.core.capture import AUTO, as_inputs, capture, propagate_values
from fxprune.core.plan import GroupSummary, Plan
from fxprune.core.rewrite import Pruning, rewrite
from fxprune.core.select import check_patterns, select
from fxprune.core.ungrouped import ungrouped
from fxprune.data.criteria import Criterion, check_criterion, check_data, gather_evidence, score_groups
from fxprune.errors import PlanMismatchError
from fxprune.options import PruneOptions, check_route

#: What a graph offers instead of the options only the HF adapter honours.
GRAPH_INSTEAD = {**dict.fromkeys(("block_criterion", "block_repair"), "on a graph, the drop-blocks pass removes whole "
                                 "residual blocks (DropBlocks(criterion=..., repair=...))"),
                 "expert_criterion": "on a graph, the drop-experts pass removes whole experts "
                                     "(DropExperts(criterion=...))"}

#: ``selector(analysis, scores, options) -> Dropped``: how units are chosen (default :func:`select`).
Selector = Callable[[Analysis, Mapping[str, torch.Tensor], PruneOptions], Dropped]


@dataclass(frozen=True)
class RunData:
    """What a run reads besides the model and the options: never part of a plan."""

    calibration: Any = None
    """Batches for the data-aware criteria (any iterable, or ``fxprune.Calibration``)."""
    loss_fn: Optional[Callable] = None
    """``(output, target) -> loss`` for ``taylor`` and ``hessian``."""
    batch: Optional[tuple] = None
    """One ``(inputs, target)`` batch for the one-batch ``taylor``."""
    progress: bool = False
    """Show progress bars."""
    source: Any = None
    """A recovery pass: the graph the last pruning pass received (what it compares with)."""


@dataclass(frozen=True)
class PruneResult:
    """What :func:`fxprune.prune` returns: the new model, the plan, and the analysis it came from."""

    graph_module: fx.GraphModule
    plan: Plan
    analysis: Analysis
    drop: Dropped
    """The dropped channel classes of ``analysis.solution``."""
    example_inputs: tuple
    recovery: tuple = ()
    """The :class:`~fxprune.data.recovery.RecoveryReport` of each ``recover=`` step (per-layer fit errors)."""
    structural: Optional[fx.GraphModule] = None
    """With ``recover=``: the pruned model before recovery, what :func:`fxprune.verify` checks."""
    module: Optional[torch.nn.Module] = None
    """With ``output="module"``: the model's own class, smaller, checked against ``graph_module``
    (:mod:`fxprune.module`)."""

    @property
    def level(self) -> str:
        return self.analysis.level

    @property
    def groups(self):
        return self.analysis.groups

    def __deepcopy__(self, memo: dict) -> "PruneResult":
        """Every field copied (the plan and the analysis are immutable values, shared)."""
        fields = {name: copy.deepcopy(getattr(self, name), memo)
                  for name in ("graph_module", "drop", "example_inputs", "recovery", "structural", "module")}
        return PruneResult(plan=self.plan, analysis=self.analysis, **fields)


# --- the stages -----------------------------------------------------------------------------------
def analyze(model: Any, example_inputs: Any, options: PruneOptions, dynamic_shapes: Any = AUTO) -> Analysis:
    """capture + match: the groups of ``model`` at ``options.capture``'s level, and why any are frozen."""
    captured = capture(model, example_inputs, options.capture, dynamic_shapes)
    return match(captured.gm, captured.level, AnalysisOptions(options.prune_outputs, options.split_axis,
                                                                 bool(options.code_sizes)))


def check_run(options: PruneOptions, criterion: Optional[Criterion], data: RunData) -> None:
    """Refuse a criterion that does not exist or lacks its data, before any work."""
    chosen = criterion if criterion is not None else options.criterion
    check_criterion(chosen, options.reduce)
    check_data(chosen, data.calibration, data.loss_fn, data.batch)


def score(analysis: Analysis, options: PruneOptions, criterion: Optional[Criterion] = None,
          data: RunData = RunData(), groups: Optional[Sequence[Group]] = None) -> dict[str, torch.Tensor]:
    """One score per unit of every prunable group (``criterion``: a callable that overrides the
    options' named one); of ``groups`` only, where the caller knows no other group loses a unit."""
    chosen = criterion if criterion is not None else options.criterion
    check_run(options, criterion, data)
    evidence = gather_evidence(analysis, chosen, data.calibration, data.loss_fn, data.batch, data.progress, groups)
    return score_groups(analysis, analysis.groups if groups is None else tuple(groups), chosen, options.reduce,
                        options.seed, evidence=evidence)


def choose(analysis: Analysis, scores: Mapping[str, torch.Tensor], options: PruneOptions,
           selector: Optional[Selector] = None) -> tuple[Dropped, Plan]:
    """select + plan: the dropped classes and the plan that records them with ``options``."""
    check_patterns(analysis.groups, options)
    drop = (selector or select)(analysis, scores, options)
    return drop, make_plan(analysis, drop, options)


def rewrite_graph(analysis: Analysis, drop: Dropped, inputs: Sequence, options: PruneOptions
                  ) -> fx.GraphModule:
    """Rewrite (folding biases if the options ask) and refresh traced values, so the result can be
    captured or pruned again."""
    gm = rewrite(analysis, drop)
    if options.propagate_bias:
        fold_biases(analysis, drop, gm, as_inputs(inputs))
    propagate_values(gm, as_inputs(inputs), rewritten=True)
    return gm


def run(model: Any, example_inputs: Any, options: PruneOptions, criterion: Optional[Criterion] = None,
        data: RunData = RunData(), dynamic_shapes: Any = AUTO, step: Callable[[str], None] = lambda _: None
        ) -> PruneResult:
    """Every stage in order (``step(name)`` after each, for a progress bar): the structural pruning
    :func:`fxprune.prune` and ``prune-channels`` return."""
    check_run(options, criterion, data)
    analysis = analyze(model, example_inputs, options, dynamic_shapes)
    step("match")
    scores = score(analysis, options, criterion, data)
    step("score")
    drop, plan = choose(analysis, scores, options.replace(capture=analysis.level))
    step("select")
    inputs = as_inputs(example_inputs)
    gm = rewrite_graph(analysis, drop, inputs, options)
    step("rewrite")
    return PruneResult(gm, plan, analysis, drop, inputs)


def prepare(options: Optional[PruneOptions] = None, sparsity: Any = None, criterion: Optional[Criterion] = None,
            capture: Optional[str] = None, *, calibration: Any = None, loss_fn: Optional[Callable] = None,
            batch: Optional[tuple] = None, progress: bool = False, **option_fields: Any
            ) -> tuple[PruneOptions, Optional[Criterion], RunData]:
    """:func:`fxprune.prune`'s keywords as ``(options, a callable criterion or None, run data)``."""
    named = criterion if isinstance(criterion, str) or criterion is None else criterion_name(criterion)
    options = PruneOptions.build(options, sparsity=sparsity, criterion=named, capture=capture, **option_fields)
    check_route(options, "fxprune.prune", GRAPH_INSTEAD)
    return options, criterion if callable(criterion) else None, RunData(calibration, loss_fn, batch, progress)


def prune(model: Any, example_inputs: Any, *, dynamic_shapes: Any = AUTO,
          step: Callable[[str], None] = lambda _: None, **arguments: Any) -> PruneResult:
    """The structural pruning of :func:`fxprune.prune` (its keywords, no recovery): what the same-class
    adapter (:mod:`fxprune.module`) and ``prune-channels`` build on."""
    options, scorer, data = prepare(**arguments)
    return run(model, example_inputs, options, scorer, data, dynamic_shapes, step)


def criterion_name(criterion: Criterion) -> str:
    """What a plan records of a criterion: its name, or a callable's ``__name__``."""
    return criterion if isinstance(criterion, str) else getattr(criterion, "__name__", "callable")


# --- plans ----------------------------------------------------------------------------------------
def make_plan(analysis: Analysis, drop: Dropped, options: PruneOptions) -> Plan:
    """The plan of ``drop``: kept indices per tensor, group summaries, ``options`` and the ungrouped."""
    if not isinstance(options, PruneOptions):  # a plan's options are read back as attributes
        raise TypeError(f"make_plan takes a PruneOptions, got {type(options).__name__}")
    kept = Pruning(analysis, drop).param_kept()
    kept_indices = {k: {d: tuple(idx.tolist()) for d, idx in dims.items()} for k, dims in kept.items()}
    shapes = {k: tuple(analysis.tensor(k).shape) for k in kept}
    return Plan(kept_indices, shapes, _summaries(analysis, drop), options, ungrouped(analysis))


def _summaries(analysis: Analysis, drop: Dropped) -> tuple[GroupSummary, ...]:
    out = []
    for g in analysis.groups:
        dropped = drop.count_of(g.units)
        out.append(GroupSummary(g.name, g.size, g.size - dropped, g.exact, len(g.frozen_units), g.reasons))
    return tuple(out)


def drop_from_plan(analysis: Analysis, plan: Plan) -> Dropped:
    """The dropped classes a plan implies; the plan must account for every tied position."""
    solution = analysis.solution
    drop = torch.zeros(solution.root.numel(), dtype=torch.bool)
    spanned = {(m.key, m.dim) for g in analysis.groups for m in g.members}  # a kernel dim is no channel dim
    for key, dims in plan.kept_indices.items():
        ids = _param_ids(analysis, key, plan)
        for dim, kept in dims.items():
            if dim >= len(ids) or ids[dim] is None or (key, dim) not in spanned:
                raise PlanMismatchError(f"plan prunes dim {dim} of {key!r}, which no channel group spans "
                                        f"(it has {len(ids)} dims)")
            dropped = _dropped_positions(key, dim, kept, ids[dim].numel())
            roots = solution.root[ids[dim][dropped]]
            if bool(solution.frozen[roots].any()):
                raise PlanMismatchError(f"plan drops channels of {key!r} (dim {dim}) that this graph "
                                        f"must keep: {solution.reasons.get(int(roots[solution.frozen[roots]][0]), 'frozen')}")
            drop[roots] = True
    drop = Dropped(drop)
    actual = Pruning(analysis, drop).param_kept()
    expected = {k: {d: tuple(v) for d, v in dims.items()} for k, dims in plan.kept_indices.items()}
    got = {k: {d: tuple(int(i) for i in v) for d, v in dims.items()} for k, dims in actual.items()}
    if got != expected:
        extra = sorted(set(got) ^ set(expected)) or [k for k in got if got[k] != expected.get(k)]
        raise PlanMismatchError(f"the plan does not fit this model's channel ties; first mismatch at "
                                f"{extra[:3]}")
    return drop


def _param_ids(analysis: Analysis, key: str, plan: Plan):
    if key not in analysis.params:
        raise PlanMismatchError(f"plan names {key!r}, which this model does not use as a prunable tensor")
    shape = tuple(analysis.tensor(key).shape)
    if plan.shapes.get(key, shape) != shape:
        raise PlanMismatchError(f"plan expects {key!r} of shape {list(plan.shapes[key])}, the model has "
                                f"{list(shape)}")
    return analysis.params[key]


def _dropped_positions(key: str, dim: int, kept: Sequence[int], size: int) -> torch.Tensor:
    kept_t = torch.tensor(list(kept), dtype=torch.long)
    if kept_t.numel() and (int(kept_t.min()) < 0 or int(kept_t.max()) >= size):
        raise PlanMismatchError(f"plan keeps index out of range for {key!r} dim {dim} (size {size})")
    if kept_t.numel() == 0:
        raise PlanMismatchError(f"plan keeps no index of {key!r} dim {dim}")
    mask = torch.ones(size, dtype=torch.bool)
    mask[kept_t] = False
    return mask.nonzero().flatten()


def apply(model: Any, plan: Plan, example_inputs: Any, capture_level: Optional[str] = None) -> PruneResult:
    """Apply a plan (from this model or a fresh copy of it): the same pruned model it came from."""
    options = plan.options.replace(capture=capture_level or plan.options.capture)
    analysis = analyze(model, example_inputs, options)
    drop = drop_from_plan(analysis, plan)
    inputs = as_inputs(example_inputs)
    gm = rewrite_graph(analysis, drop, inputs, options)
    return PruneResult(gm, make_plan(analysis, drop, plan.options), analysis, drop, inputs)
