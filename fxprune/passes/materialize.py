"""``materialize``: a masked graph becomes the physically smaller one.

The inverse half of :mod:`~fxprune.passes.mask_channels`: the mask nodes (``mul(x,
fxprune_mask_<i>)``) and their buffers are stripped, and the plan the masking recorded in
``gm.meta["fxprune_plan"]`` is applied to what remains with :func:`fxprune.apply_plan` — so the
weights *as trained around the masks* are sliced, and the result computes what the masked graph
computed (to float tolerance on exact groups), with fewer parameters and no masks.

A graph with neither masks nor a recorded plan is returned as a copy (``modified`` is False); masks
without a plan (the metadata was lost, e.g. by another pass in between) are refused with an error.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch.fx as fx

from fxprune.stages import apply
from fxprune.core.capture import graph_level
from fxprune.errors import PipelineError
from fxprune.passes.pipeline import Pass, placeholder_zeros, register

from fxprune.core.meta import PLAN_KEY
from fxprune.passes.mask_channels import has_masks, is_mask, masked_plan, strip_masks


@register
@dataclass(frozen=True)
class Materialize(Pass):
    """Strip the masks of :class:`~fxprune.passes.MaskChannels` and drop the channels they masked."""

    name = "materialize"

    def apply(self, gm: fx.GraphModule) -> fx.GraphModule:
        plan = masked_plan(gm)
        if plan is None and has_masks(gm):
            first = next(str(n.args[1].target) for n in gm.graph.nodes if is_mask(n))
            raise PipelineError(f"the graph is masked ({first}...) but carries no plan "
                                f"(gm.meta[{PLAN_KEY!r}]); run mask-channels right before materialize")
        if plan is None:
            return copy.deepcopy(gm)
        stripped = strip_masks(gm)
        return apply(stripped, plan, placeholder_zeros(gm), graph_level(gm)).graph_module
