"""One call that checks every promise a pruned model makes — what tests, the zoo and the fuzzer use.

>>> report = fxprune.testing.check.check_pruned(model, (x,), sparsity=0.5, capture="export")   # doctest: +SKIP
>>> report.params_after < report.params_before                                        # doctest: +SKIP
True

It prunes, then asserts: the input model's state_dict and code are untouched; the result runs and keeps
the output shapes; it has fewer parameters (when something was prunable); ``verify`` passes — the pruned
model equals the reference (dropped channels contribute nothing, norms' statistics over kept channels) to
float tolerance, for every model, LayerNorm-family ones included; a second run gives byte-identical code
and tensors; and the plan survives JSON and re-applies to the same result.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.utils._pytree as pytree

from fxprune.api import PruneResult, apply_plan, prune, verify
from fxprune.core.capture import as_inputs
from fxprune.core.plan import Plan
from fxprune.core.verify import VerifyReport, eval_copy


@dataclass(frozen=True)
class CheckReport:
    result: PruneResult
    verify: VerifyReport
    params_before: int
    params_after: int


def _snapshot(model: Any) -> tuple[dict, str]:
    """Every tensor the model holds (non-persistent buffers and an ExportedProgram's constants included:
    a forward that writes a buffer must not write the user's) and its code."""
    if isinstance(model, torch.export.ExportedProgram):  # state_dict is a property there
        state, code = {**model.state_dict, **model.constants}, str(model.graph)
    else:
        state, code = {**model.state_dict(), **dict(model.named_buffers())}, getattr(model, "code", "")
    return {k: v.detach().clone() for k, v in state.items() if isinstance(v, torch.Tensor)}, code


def _same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _outputs(model: Any, inputs: tuple) -> list[torch.Tensor]:
    m = eval_copy(model)  # training BatchNorm or observers would change the model by running it
    with torch.no_grad():
        return [t for t in pytree.tree_leaves(m(*inputs)) if isinstance(t, torch.Tensor)]


def _params(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


def check_pruned(model: Any, example_inputs: Any, *, expect_shrink: bool = True,
                 deterministic: bool = True, **options: Any) -> CheckReport:
    """Prune ``model`` with ``options`` and assert every promise; returns what it measured."""
    inputs = as_inputs(example_inputs)
    before = _snapshot(model)
    result = prune(model, inputs, **options)
    after = _snapshot(model)
    assert _same_state(before[0], after[0]) and before[1] == after[1], "prune mutated its input"
    original = model.module() if isinstance(model, torch.export.ExportedProgram) else model
    ref_shapes = [t.shape for t in _outputs(original, inputs)]
    new_shapes = [t.shape for t in _outputs(result.graph_module, inputs)]
    if not options.get("prune_outputs"):
        assert ref_shapes == new_shapes, f"output shapes changed: {ref_shapes} -> {new_shapes}"
    p0, p1 = _params(original), _params(result.graph_module)
    if expect_shrink:
        assert p1 < p0, f"nothing was pruned ({p0} parameters before and after)"
    report = verify(model, result, inputs)
    assert report.passed, str(report)
    if deterministic:
        _check_rerun(model, inputs, result, options)
    return CheckReport(result, report, p0, p1)


def _check_rerun(model: Any, inputs: tuple, result: PruneResult, options: dict) -> None:
    again = prune(model, inputs, **options)
    assert again.graph_module.code == result.graph_module.code, "a rerun produced different code"
    assert _same_state(again.graph_module.state_dict(), result.graph_module.state_dict()), \
        "a rerun produced different tensors"
    plan = Plan.from_json(result.plan.to_json())
    assert plan == result.plan, "the plan did not survive JSON"
    applied = apply_plan(model, plan, inputs, capture=result.level)
    assert _same_state(applied.graph_module.state_dict(), result.graph_module.state_dict()), \
        "applying the plan gave different tensors"
