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

from typing import Any

from fxprune.api import register_output
from fxprune.module.check import check
from fxprune.module.files import load, save
from fxprune.module.graph import prune_graph
from fxprune.module.rebuild import rebuild
from fxprune.module.run import ModuleResult, prune, prune_module, to_module

register_output("module", prune_module)  # fxprune.prune(..., output="module")


def __getattr__(name: str) -> Any:  # the parts adapter loads on first use
    if name in ("prune_parts", "PartsResult", "find_parts"):
        from fxprune.module import parts
        return getattr(parts, name)
    raise AttributeError(name)


__all__ = ["ModuleResult", "to_module", "rebuild", "check", "prune", "prune_graph", "prune_module", "save", "load", "prune_parts", "PartsResult", "find_parts"]
