"""The adapter's entry points: the model's own class from a pruning result, or from a model.

``fxprune.api`` imports :func:`prune_module` for ``output="module"``; nothing here imports
``fxprune.api`` (the graph pruning is :func:`fxprune.module.graph.prune_graph`).

>>> out = to_module(model, fxprune.prune(model, (x,), sparsity=0.5))   # doctest: +SKIP
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fxprune.module.check import check
from fxprune.module.graph import prune_graph
from fxprune.module.rebuild import rebuild

TOLERANCE = {torch.float16: 1e-2, torch.bfloat16: 2e-2}
"""Relative tolerance of the check by parameter dtype (float32 and wider: 1e-4)."""


@dataclass(frozen=True)
class ModuleResult:
    """The user's class back, beside the pruning it came from."""

    module: nn.Module
    """A smaller instance of the model's own class; its forward is the user's code."""
    result: Any
    """The :class:`~fxprune.stages.PruneResult` (plan, pruned graph, analysis)."""
    max_abs_error: float
    """The largest difference between ``module``'s outputs and the pruned graph's (eval mode)."""

    @property
    def plan(self):
        return self.result.plan


def to_module(model: nn.Module, result: Any, example_inputs: Any = None) -> ModuleResult:
    """Rebuild ``model`` per ``result.plan`` and check it against ``result.graph_module``.

    >>> out = to_module(model, fxprune.prune(model, (x,), sparsity=0.5))   # doctest: +SKIP
    >>> out.module(x).shape                                                # doctest: +SKIP
    """
    from fxprune.core.capture import as_inputs

    inputs = result.example_inputs if example_inputs is None else as_inputs(example_inputs)
    small = rebuild(model, result)
    error = check(small, result.graph_module, inputs, tolerance=tolerance_of(model))
    return ModuleResult(small, result, error)


def tolerance_of(model: nn.Module) -> float:
    dtypes = {p.dtype for p in model.parameters()}
    return max((TOLERANCE.get(d, 1e-4) for d in dtypes), default=1e-4)


def prune(model: nn.Module, example_inputs: Any, **options: Any) -> ModuleResult:
    """``fxprune.prune`` with the model's own class back: every keyword of :func:`fxprune.prune`.

    >>> small = fxprune.module.prune(model, (x,), sparsity=0.5).module     # doctest: +SKIP
    """
    return to_module(model, prune_graph(model, example_inputs, **options))


def prune_module(model: nn.Module, example_inputs: Any, **arguments: Any) -> Any:
    """What ``fxprune.prune(..., output="module")`` returns: the :class:`~fxprune.stages.PruneResult` with
    ``module`` set; a model not traceable whole is pruned through its parts (its graph is then the
    parts' joined graph)."""
    import dataclasses

    from fxprune.errors import CaptureError

    try:
        result = prune_graph(model, example_inputs, **arguments)
    except CaptureError:
        from fxprune.module.parts import prune_parts
        parts = prune_parts(model, example_inputs, **arguments)
        return dataclasses.replace(parts.result, module=parts.module)
    return dataclasses.replace(result, module=to_module(model, result).module)


