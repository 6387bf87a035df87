"""The graph pruning the adapter builds on: :func:`fxprune.prune`'s composition without recovery.

The adapter calls :func:`fxprune.stages.run` itself (``fxprune.api`` imports the adapter for
``output="module"``, so the adapter never imports ``fxprune.api``).

>>> result = prune_graph(model, (x,), sparsity=0.5)      # doctest: +SKIP
"""
from __future__ import annotations

from typing import Any, Callable, Optional

from fxprune.core.capture import AUTO
from fxprune.options import PruneOptions
from fxprune.stages import PruneResult, RunData, criterion_name, run


def prune_graph(model: Any, example_inputs: Any, sparsity: Any = None, criterion: Any = None,
                capture: Optional[str] = None, *, options: Optional[PruneOptions] = None, calibration: Any = None,
                loss_fn: Optional[Callable] = None, batch: Optional[tuple] = None, progress: bool = False,
                dynamic_shapes: Any = AUTO, **option_fields: Any) -> PruneResult:
    """:func:`fxprune.prune`'s arguments (all but ``recover`` and ``output``), the same result."""
    named = criterion if isinstance(criterion, str) or criterion is None else criterion_name(criterion)
    options = PruneOptions.build(options, sparsity=sparsity, criterion=named, capture=capture, **option_fields)
    scorer = criterion if callable(criterion) else None
    return run(model, example_inputs, options, scorer, RunData(calibration, loss_fn, batch, progress),
               dynamic_shapes)
