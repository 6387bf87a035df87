"""The ``--output module`` route of ``fxprune prune``: the model's own class back (:mod:`fxprune.module`).

``fxprune prune MODULE:FACTORY --input-shape 1,3,224,224 --output module --out DIR`` prunes the model the
factory builds and writes what the user's code loads: ``model.safetensors`` (the pruned module's
``state_dict``, under the model's own names), ``plan.json``, ``sizes.json`` and ``summary.md``. Load it
with ``fxprune.module.load(DIR, FACTORY())``. A model that cannot be traced whole is pruned through its
traceable parts (:func:`fxprune.module.prune_parts`); the summary lists them.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from fxprune.errors import CaptureError, InvalidOptionError

FILES = "model.safetensors plan.json sizes.json summary.md"
UNSUPPORTED = {"calibration": None, "to": None, "quantize": None}
"""Run flags this route refuses: (flag, its value when not given)."""


def prune_and_write(args: argparse.Namespace, model: Any, inputs: tuple, options: Any) -> str:
    """Prune with :mod:`fxprune.module` and write ``--out``; returns the summary text."""
    import fxprune.module
    from fxprune.measure import count_params

    _refuse(args, model)
    try:
        out, how = fxprune.module.prune(model, inputs, options=options), "traced whole"
    except CaptureError:
        out = fxprune.module.prune_parts(model, inputs, options=options)
        how = f"{len(out.parts)} traceable parts: {', '.join(out.parts)}"
    text = "\n".join([f"# fxprune: {args.spec}, same class back ({type(out.module).__name__})", "",
                      f"pruned: {how}",
                      f"params: {count_params(model):,} -> {count_params(out.module):,}",
                      f"own forward vs pruned graph: max abs error {out.max_abs_error:.3g}", ""])
    fxprune.module.save(out, Path(args.out), model, extra={"summary.md": text.encode("utf-8")})
    return text


def _refuse(args: argparse.Namespace, model: Any) -> None:
    if not isinstance(model, torch.nn.Module) or isinstance(model, torch.fx.GraphModule):
        raise InvalidOptionError("--output module needs a module object (MODULE:FACTORY or torchvision:NAME), "
                                 f"not a {type(model).__name__}")
    given = [f"--{k.replace('_', '-')}" for k, default in UNSUPPORTED.items() if getattr(args, k, default) != default]
    if given:
        raise InvalidOptionError(f"--output module does not take {', '.join(given)}")
