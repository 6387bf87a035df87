"""The one-call API: ``prune`` composes capture -> match -> score -> select -> rewrite.

>>> import fxprune, torch, torchvision
>>> model = torchvision.models.resnet18().eval()
>>> x = torch.randn(1, 3, 64, 64)
>>> result = fxprune.prune(model, (x,), sparsity=0.5, criterion="l1")     # doctest: +SKIP
>>> result.graph_module(x).shape                                          # doctest: +SKIP
torch.Size([1, 1000])
>>> fxprune.verify(model, result, (x,)).passed                            # doctest: +SKIP
True
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
import torch.fx as fx

from fxprune.core.analysis import Analysis, AnalysisOptions, match
from fxprune.core.capture import as_inputs, capture as capture_graph, propagate_values
from fxprune.errors import CalibrationError, InvalidOptionError, PlanMismatchError
from fxprune.core.bias_folding import constant_reference, fold_biases, folded_biases, folding_is_exact
from fxprune.data.criteria import DEFAULT_CRITERION, Criterion, check_criterion, check_data, gather_evidence, score_groups
from fxprune.core.ungrouped import ungrouped
from fxprune.options import PruneOptions
from fxprune.core.plan import GroupSummary, Plan
from fxprune.core.purity import leaves_models_untouched
from fxprune.data.recovery import recover as recover_model, recovery_steps
from fxprune.core.rewrite import Pruning, rewrite
from fxprune.core.select import Policy, Sparsity, check_patterns, select
from fxprune.core.verify import VerifyReport, check_other_sizes, check_same_model, compare, output_masks, quantizer_state_mismatch, reference_model


@dataclass(frozen=True)
class PruneResult:
    """What :func:`prune` returns: the new model, the plan, and the analysis it came from."""

    graph_module: fx.GraphModule
    plan: Plan
    analysis: Analysis
    drop: torch.Tensor
    example_inputs: tuple
    recovery: tuple = ()
    """The :class:`~fxprune.data.recovery.RecoveryReport` of each ``recover=`` step (per-layer fit errors)."""
    structural: Optional[fx.GraphModule] = None
    """With ``recover=``: the pruned model before recovery, what :func:`verify` checks."""

    @property
    def level(self) -> str:
        return self.analysis.level

    @property
    def groups(self):
        return self.analysis.groups


def _stages(progress: bool, total: int):
    if not progress:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, desc="fxprune", unit="stage", leave=False)


def _step(bar, name: str) -> None:
    if bar is not None:
        bar.set_postfix_str(name)
        bar.update(1)


@leaves_models_untouched
def analyze(model: Any, example_inputs: Any, capture: str = "fx", *, prune_outputs: bool = False,
            split_axis: str = "largest", dynamic_shapes: Any = "auto") -> Analysis:
    """Capture and match only: the groups, and why any are frozen (what ``fxprune inspect`` prints)."""
    if split_axis not in ("largest", "outer"):
        raise InvalidOptionError(f"split_axis must be 'largest' or 'outer', got {split_axis!r}")
    captured = capture_graph(model, example_inputs, capture, dynamic_shapes)
    return match(captured.gm, captured.level, AnalysisOptions(prune_outputs, split_axis))


@leaves_models_untouched
def prune(model: Any, example_inputs: Any, sparsity: Sparsity = 0.5, criterion: Criterion = DEFAULT_CRITERION,
          capture: str = "fx", *, reduce: str = "mean", global_ranking: bool = False,
          round_to: int = 1, min_keep: int = 1, ignore: Sequence[str] = (),
          prune_outputs: bool = False, propagate_bias: bool = False, seed: int = 0, loss_fn: Optional[Callable] = None,
          batch: Optional[tuple] = None, calibration: Any = None, normalize: str = "mean",
          min_keep_ratio: float = 0.0, split_axis: str = "largest",
          progress: bool = False, recover: Sequence[str] = (), dynamic_shapes: Any = "auto") -> PruneResult:
    """Prune ``model`` and return a new, smaller GraphModule; ``model`` is never modified.

    Args:
        model: an ``nn.Module``, a ``GraphModule`` (used as it is) or an ``ExportedProgram``.
        example_inputs: a tensor or tuple of tensors the model accepts.
        sparsity: fraction of each group's units to drop, or ``{module pattern: ratio}``.
        criterion: a name from ``fxprune.data.criteria.CRITERIA`` (``"l1"``, ``"group_magnitude"``,
            ``"wanda"``, ``"flap"``, ``"taylor"``, ...) or a callable ``(group, tensors) -> scores``.
        calibration: batches for the data-aware criteria (``activation``, ``wanda``, ``flap``,
            ``taylor``, ``hessian``): any iterable of batches, or ``fxprune.Calibration(data,
            inputs=..., target=..., max_batches=...)`` to say which part of a batch is the input.
        normalize: how ``global_ranking`` compares groups: ``"mean"``, ``"none"``, ``"max"``,
            ``"standardize"`` (FLAP's adaptive ratios) or ``"lamp"``.
        min_keep_ratio: every group keeps at least this fraction of its units.
        round_to: kept channel counts are a multiple of ``round_to`` (vector kernels want aligned
            widths); a unit of several channels (an attention head) counts as that many channels.
        capture: ``"fx"`` (symbolic_trace) or ``"export"`` (torch.export, ATen level).
        propagate_bias: fold each dropped channel's constant part (its bias through BN and
            activations) into the consumers' biases, like torch.ao's ``prune_bias=False``.
        recover: recovery steps run on ``calibration`` after pruning, in order (see
            :mod:`fxprune.data.recovery`): ``"compensate-bias"`` (or ``"bias"``), ``"reconstruct"``,
            ``"recalibrate-batchnorm"`` (or ``"batchnorm"``). ``result.recovery`` reports each layer's
            fit; :func:`verify` checks the structural pruning before recovery.
        dynamic_shapes: export level: ``"auto"`` (dynamic batch, and sequence for token inputs),
            ``None`` (the example's sizes only) or a ``torch.export`` spec.
    """
    policy = Policy(sparsity, global_ranking, round_to, min_keep, tuple(ignore), normalize, min_keep_ratio)
    check_criterion(criterion, reduce)
    check_data(criterion, calibration, loss_fn, batch)
    steps = check_recovery(recover, calibration)
    bar = _stages(progress, 4)
    analysis = analyze(model, example_inputs, capture, prune_outputs=prune_outputs, split_axis=split_axis,
                       dynamic_shapes=dynamic_shapes)
    _step(bar, "match")
    check_patterns(analysis.groups, policy)
    evidence = gather_evidence(analysis, criterion, calibration, loss_fn, batch, progress)
    scores = score_groups(analysis, analysis.groups, criterion, reduce, seed, evidence=evidence)
    _step(bar, "score")
    drop = select(analysis, scores, policy)
    options = PruneOptions(sparsity, criterion_name(criterion), analysis.level, reduce, global_ranking, round_to,
                           min_keep, tuple(ignore), normalize, min_keep_ratio, prune_outputs, split_axis,
                           propagate_bias, seed)
    plan = make_plan(analysis, drop, options)
    _step(bar, "select")
    gm = finish(analysis, drop, as_inputs(example_inputs), propagate_bias)
    _step(bar, "rewrite")
    if bar is not None:
        bar.close()
    if not steps:
        return PruneResult(gm, plan, analysis, drop, as_inputs(example_inputs))
    recovered, reports = recover_model(analysis, drop, gm, calibration, steps, progress=progress)
    propagate_values(recovered, as_inputs(example_inputs), rewritten=True)
    return PruneResult(recovered, plan, analysis, drop, as_inputs(example_inputs), reports, gm)


def check_recovery(recover: Any, calibration: Any) -> tuple[str, ...]:
    """``recover=`` as step names; recovery without calibration data is refused before any work."""
    steps = recovery_steps(recover)
    if steps and calibration is None:
        raise CalibrationError(f"recover={list(steps)} needs calibration data: pass calibration=loader "
                               f"(any iterable of batches)")
    return steps


def finish(analysis: Analysis, drop: torch.Tensor, inputs: tuple, propagate_bias: bool = False
           ) -> fx.GraphModule:
    """Rewrite (folding biases if asked) and refresh traced values, so the result can be captured or
    pruned again."""
    gm = rewrite(analysis, drop)
    if propagate_bias:
        fold_biases(analysis, drop, gm, inputs)
    propagate_values(gm, inputs, rewritten=True)
    return gm


def criterion_name(criterion: Criterion) -> str:
    """What a plan records of a criterion: its name, or a callable's ``__name__``."""
    return criterion if isinstance(criterion, str) else getattr(criterion, "__name__", "callable")


def make_plan(analysis: Analysis, drop: torch.Tensor, options: PruneOptions) -> Plan:
    if not isinstance(options, PruneOptions):  # a plan's options are read back as attributes
        raise TypeError(f"make_plan takes a PruneOptions, got {type(options).__name__}")
    kept = Pruning(analysis, drop).param_kept()
    kept_indices = {k: {d: tuple(idx.tolist()) for d, idx in dims.items()} for k, dims in kept.items()}
    shapes = {k: tuple(analysis.tensor(k).shape) for k in kept}
    return Plan(kept_indices, shapes, _summaries(analysis, drop), options, ungrouped(analysis))


def _summaries(analysis: Analysis, drop: torch.Tensor) -> tuple[GroupSummary, ...]:
    out = []
    for g in analysis.groups:
        dropped = int(drop[torch.tensor(g.units, dtype=torch.long)].sum()) if g.units else 0
        out.append(GroupSummary(g.name, g.size, g.size - dropped, g.exact, len(g.frozen_units), g.reasons))
    return tuple(out)


@leaves_models_untouched
def apply_plan(model: Any, plan: Plan, example_inputs: Any, capture: Optional[str] = None) -> PruneResult:
    """Apply a plan (from this model or a fresh copy of it) and return the same pruned model.

    >>> again = fxprune.apply_plan(fresh_model, result.plan, (x,))       # doctest: +SKIP
    """
    options = plan.options
    analysis = analyze(model, example_inputs, capture or options.capture, prune_outputs=options.prune_outputs,
                       split_axis=options.split_axis)
    drop = drop_from_plan(analysis, plan)
    gm = finish(analysis, drop, as_inputs(example_inputs), options.propagate_bias)
    return PruneResult(gm, make_plan(analysis, drop, plan.options), analysis, drop, as_inputs(example_inputs))


def drop_from_plan(analysis: Analysis, plan: Plan) -> torch.Tensor:
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


@leaves_models_untouched
def verify(model: Any, result: PruneResult, example_inputs: Any = None,
           tolerance: Optional[float] = None, raise_on_failure: bool = False) -> VerifyReport:
    """Compare ``result`` with ``model`` whose dropped channels contribute nothing and whose norms'
    statistics run over the kept channels only (see :mod:`fxprune.verify`); the report also gives the
    drift from the unmasked original."""
    inputs = as_inputs(example_inputs) if example_inputs is not None else result.example_inputs
    analysis, drop = result.analysis, result.drop
    check_same_model(model, analysis.gm, inputs, tolerance)
    exact = not bool(analysis.solution.approximate[drop.nonzero().flatten()].any()) if drop.any() else True
    masks = output_masks(analysis, drop) if result.plan.options.prune_outputs else None
    if result.plan.options.propagate_bias and folding_is_exact(analysis, drop):
        reference = constant_reference(analysis, drop)
    elif result.plan.options.propagate_bias:  # a padded consumer: the biases are the fold's own
        reference = reference_model(analysis, drop, folded_biases(analysis, drop, result.example_inputs))
        exact = False
    else:
        reference = reference_model(analysis, drop)
    pruned = result.structural if result.structural is not None else result.graph_module  # before recovery
    report = compare(reference, pruned, inputs, exact, tolerance, masks, original=analysis.gm)
    other = check_other_sizes(model, analysis.gm, reference, pruned, inputs, tolerance, masks)
    if other:  # a graph right at the example's batch only
        report = dataclasses.replace(report, passed=False, other_sizes=other)
    mismatch = quantizer_state_mismatch(analysis.gm, pruned, result.plan.kept_indices)
    if mismatch:
        report = dataclasses.replace(report, passed=False, quantizer_mismatch=mismatch)
    if raise_on_failure and not report.passed:
        from fxprune.errors import VerificationError
        raise VerificationError(str(report))
    return report
