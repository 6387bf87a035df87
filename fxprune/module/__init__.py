"""The user's own class back: a pruned model that is a smaller instance of the model's own class.

fxprune prunes a graph; users' training code, exporters and checkpoints expect their own object (a timm
model, a torchvision detector, an ultralytics ``DetectionModel``). This adapter turns a pruning result
back into one: a deep copy of the model with its parameters and buffers sliced per the plan and its
layers' size attributes rebuilt (:mod:`fxprune.module.rebuild`), its Python ``forward`` unchanged, then
checked against the pruned graph on the example inputs and a second batch size
(:mod:`fxprune.module.check`). A forward that bakes a size into code is refused with a typed error that
points to the graph result. The copy trains like the original (BatchNorm and dropout in train mode,
``requires_grad`` kept) and pickles like it (``torch.save`` of the user's class is the user's choice;
fxprune's own files stay pickle-free).

Models whose forward cannot be captured whole (detectors' pre/post-processing and NMS, a Python loop over
layers) are pruned through their largest traceable submodules (:mod:`fxprune.module.parts`).

>>> import fxprune.module
>>> result = fxprune.prune(model, (x,), sparsity=0.5)          # doctest: +SKIP
>>> small = fxprune.module.to_module(model, result).module      # doctest: +SKIP
>>> type(small) is type(model)                                  # doctest: +SKIP
True
>>> parts = fxprune.module.prune_parts(detector, (images,), sparsity=0.5)   # doctest: +SKIP
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fxprune.module.check import check, keeping_code_sizes
from fxprune.module.files import load, save
from fxprune.module.rebuild import rebuild

TOLERANCE = {torch.float16: 1e-2, torch.bfloat16: 2e-2}
"""Relative tolerance of the check by parameter dtype (float32 and wider: 1e-4)."""


@dataclass(frozen=True)
class ModuleResult:
    """The user's class back, beside the pruning it came from."""

    module: nn.Module
    """A smaller instance of the model's own class; its forward is the user's code."""
    result: Any
    """The :class:`~fxprune.api.PruneResult` (plan, pruned graph, analysis)."""
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
    from fxprune.stages import prune as prune_graph

    result = prune_graph(model, example_inputs, **keeping_code_sizes(options))
    return to_module(model, result)


def prune_module(model: nn.Module, example_inputs: Any, **arguments: Any) -> Any:
    """What ``fxprune.prune(..., output="module")`` returns: the :class:`~fxprune.stages.PruneResult` with
    ``module`` set; a model not traceable whole is pruned through its parts (its graph is then the
    parts' joined graph)."""
    import dataclasses

    from fxprune.stages import prune as prune_graph
    from fxprune.errors import CaptureError

    try:
        result = prune_graph(model, example_inputs, **keeping_code_sizes(arguments))
    except CaptureError:
        from fxprune.module.parts import prune_parts
        parts = prune_parts(model, example_inputs, **arguments)
        return dataclasses.replace(parts.result, module=parts.module)
    return dataclasses.replace(result, module=to_module(model, result).module)


def __getattr__(name: str) -> Any:  # the parts adapter loads on first use
    if name in ("prune_parts", "PartsResult", "find_parts"):
        from fxprune.module import parts
        return getattr(parts, name)
    raise AttributeError(name)


__all__ = ["ModuleResult", "to_module", "rebuild", "check", "prune", "save", "load", "prune_parts", "PartsResult", "find_parts"]
