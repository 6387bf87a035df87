"""The one-call API: ``prune``, ``apply_plan``, ``verify`` and ``analyze`` over :mod:`fxprune.stages`.

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
from typing import Any, Callable, Optional, Sequence

import torch
import torch.fx as fx

from fxprune.core.analysis import Analysis
from fxprune.core.bias_folding import constant_reference, folded_biases, folding_is_exact
from fxprune.core.capture import AUTO, as_inputs, non_finite_tensors, propagate_values
from fxprune.core.plan import Plan
from fxprune.core.purity import leaves_models_untouched
from fxprune.core.verify import (VerifyReport, check_other_sizes, check_same_model, compare, output_masks,
                                 quantizer_state_mismatch, reference_model)
from fxprune.data.criteria import Criterion
from fxprune.data.recovery import recover as recover_model, recovery_steps
from fxprune.errors import CalibrationError, InvalidOptionError
from fxprune.options import PruneOptions, Sparsity
from fxprune.progress import stage_bar
from fxprune.stages import PruneResult, apply, prepare, run
from fxprune import stages


@leaves_models_untouched
def analyze(model: Any, example_inputs: Any, capture: str = "fx", *, prune_outputs: bool = False,
            split_axis: str = "largest", dynamic_shapes: Any = AUTO) -> Analysis:
    """Capture and match only: the groups, and why any are frozen (what ``fxprune inspect`` prints)."""
    options = PruneOptions.build(capture=capture, prune_outputs=prune_outputs, split_axis=split_axis)
    return stages.analyze(model, example_inputs, options, dynamic_shapes)


@leaves_models_untouched
def prune(model: Any, example_inputs: Any, sparsity: Optional[Sparsity] = None,
          criterion: Optional[Criterion] = None, capture: Optional[str] = None, *,
          options: Optional[PruneOptions] = None, calibration: Any = None, loss_fn: Optional[Callable] = None,
          batch: Optional[tuple] = None, recover: Sequence[str] = (), progress: bool = False,
          dynamic_shapes: Any = AUTO, output: str = "graph", **option_fields: Any) -> PruneResult:
    """Prune ``model`` and return a new, smaller GraphModule; ``model`` is never modified.

    The options (``sparsity``, ``criterion``, ``capture`` and every field of
    :class:`~fxprune.options.PruneOptions` as a keyword: ``round_to=8``, ``global_ranking=True``,
    ``ignore=("fc",)``...) are declared once there, with their defaults and checks; pass
    ``options=PruneOptions(...)`` to reuse a set (keywords given beside it override its fields).

    Args:
        model: an ``nn.Module``, a ``GraphModule`` (used as it is) or an ``ExportedProgram``.
        example_inputs: a tensor or tuple of tensors the model accepts.
        sparsity: fraction of each group's units to drop, or ``{module pattern: ratio}`` (default 0.5).
        criterion: a name from ``fxprune.data.criteria.CRITERIA`` (``"l1"``, ``"group_magnitude"``
            (default), ``"wanda"``, ``"flap"``, ``"taylor"``, ...) or a callable ``(group, tensors) -> scores``.
        capture: ``"fx"`` (symbolic_trace, default) or ``"export"`` (torch.export, ATen level).
        calibration: batches for the data-aware criteria (``activation``, ``wanda``, ``flap``,
            ``taylor``, ``hessian``): any iterable of batches, or ``fxprune.Calibration(data,
            inputs=..., target=..., max_batches=...)`` to say which part of a batch is the input.
        loss_fn, batch: ``taylor`` and ``hessian`` read gradients of ``loss_fn(output, target)``.
        recover: recovery steps run on ``calibration`` after pruning, in order (see
            :mod:`fxprune.data.recovery`): ``"compensate-bias"`` (or ``"bias"``), ``"reconstruct"``,
            ``"recalibrate-batchnorm"`` (or ``"batchnorm"``). ``result.recovery`` reports each layer's
            fit; :func:`verify` checks the structural pruning before recovery.
        dynamic_shapes: export level: ``"auto"`` (dynamic batch, and sequence for token inputs),
            ``None`` (the example's sizes only) or a ``torch.export`` spec.
        output: ``"graph"`` (default) or ``"module"``: also ``result.module``, a smaller instance of the
            model's own class (its forward unchanged, checked against the graph; :mod:`fxprune.module`).
            A model not traceable whole is then pruned through its traceable submodules.

    >>> result = fxprune.prune(model, (x,), 0.5, "l1", round_to=8)     # doctest: +SKIP
    >>> small = fxprune.prune(model, (x,), 0.5, output="module").module  # doctest: +SKIP
    """
    if output not in ("graph", "module"):
        raise InvalidOptionError(f"output must be 'graph' or 'module', got {output!r}")
    if output == "module":
        if recover:
            raise InvalidOptionError("output='module' with recover= is not supported: recovery changes the "
                                     "graph's weights, which the module would not hold; prune, then recover")
        from fxprune.module import prune_module  # an adapter: loaded only when asked for
        return prune_module(model, example_inputs, options=options, sparsity=sparsity, criterion=criterion,
                            capture=capture, calibration=calibration, loss_fn=loss_fn, batch=batch,
                            progress=progress, dynamic_shapes=dynamic_shapes, **option_fields)
    options, scorer, data = prepare(options, sparsity, criterion, capture, calibration=calibration,
                                    loss_fn=loss_fn, batch=batch, progress=progress, **option_fields)
    steps = check_recovery(recover, calibration)
    with stage_bar(progress, 4, "fxprune") as step:
        result = run(model, example_inputs, options, scorer, data, dynamic_shapes, step)
    if not steps:
        return result
    recovered, reports = recover_model(result.analysis, result.drop, result.graph_module, calibration, steps,
                                       progress=progress)
    propagate_values(recovered, result.example_inputs, rewritten=True)
    return dataclasses.replace(result, graph_module=recovered, recovery=reports, structural=result.graph_module)


def check_recovery(recover: Any, calibration: Any) -> tuple[str, ...]:
    """``recover=`` as step names; recovery without calibration data is refused before any work."""
    steps = recovery_steps(recover)
    if steps and calibration is None:
        raise CalibrationError(f"recover={list(steps)} needs calibration data: pass calibration=loader "
                               f"(any iterable of batches)")
    return steps


@leaves_models_untouched
def apply_plan(model: Any, plan: Plan, example_inputs: Any, capture: Optional[str] = None) -> PruneResult:
    """Apply a plan (from this model or a fresh copy of it) and return the same pruned model.

    >>> again = fxprune.apply_plan(fresh_model, result.plan, (x,))       # doctest: +SKIP
    """
    return apply(model, plan, example_inputs, capture)


@leaves_models_untouched
def verify(model: Any, result: PruneResult, example_inputs: Any = None,
           tolerance: Optional[float] = None, raise_on_failure: bool = False) -> VerifyReport:
    """Compare ``result`` with ``model`` whose dropped channels contribute nothing and whose norms'
    statistics run over the kept channels only (see :mod:`fxprune.verify`); the report also gives the
    drift from the unmasked original."""
    inputs = as_inputs(example_inputs) if example_inputs is not None else result.example_inputs
    analysis, drop = result.analysis, result.drop
    check_same_model(model, analysis.gm, inputs, tolerance)
    exact = not bool(analysis.solution.approximate[drop.indices()].any())
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
    report = dataclasses.replace(report, non_finite=tuple(non_finite_tensors(analysis.gm)))
    if raise_on_failure and not report.passed:
        from fxprune.errors import VerificationError
        raise VerificationError(str(report))
    return report
