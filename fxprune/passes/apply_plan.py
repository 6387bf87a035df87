"""``apply-plan``: re-apply a saved plan (its JSON text) to a captured graph.

The plan is parsed when the pass is built, so a malformed plan fails at once (and never unpickles
anything); whether it *fits* the graph — same parameter names and shapes, every tied channel accounted
for — is checked when the pass runs (:class:`~fxprune.errors.PlanMismatchError`). Like pruning, this
pass is one-shot: the plan names the original model's indices.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx

from fxprune.stages import apply
from fxprune.core.capture import graph_level
from fxprune.errors import InvalidOptionError, UnsafeFileError
from fxprune.passes.pipeline import Pass, placeholder_zeros, record_plan, register
from fxprune.core.plan import Plan


@register
@dataclass(frozen=True)
class ApplyPlan(Pass):
    """Prune exactly as a saved :class:`~fxprune.core.plan.Plan` says."""

    name = "apply-plan"

    plan_json: str
    """The plan, as :meth:`fxprune.core.plan.Plan.to_json` wrote it."""

    @classmethod
    def of(cls, plan: Plan) -> "ApplyPlan":
        """The pass applying ``plan``."""
        return cls(plan.to_json(indent=None))

    @property
    def plan(self) -> Plan:
        return Plan.from_json(self.plan_json)

    def validate(self) -> None:
        try:
            self.plan
        except UnsafeFileError as exc:
            raise InvalidOptionError(f"plan_json is not a plan: {exc}") from exc

    def apply(self, gm: fx.GraphModule) -> fx.GraphModule:
        result = apply(gm, self.plan, placeholder_zeros(gm), graph_level(gm))
        return record_plan(result.graph_module, result.plan)  # what recovery passes map layers with
