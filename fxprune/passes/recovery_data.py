"""What the three recovery passes share: their calibration data and source graph, bound at run time.

A recovery pass's options are typed fields like any pass's; its *data* is not an option (it is not
printed, parsed or compared): ``Pipeline(...)(gm, calibration=loader)`` binds the calibration batches
to each recovery pass, with the graph the last pruning pass received (``source``); a direct call binds
them with :meth:`RecoveryPass.with_calibration`. The layers of the source and the pruned graph are
matched through the plan the pruning pass recorded on its output (``prune-channels`` and
``apply-plan`` do, see :func:`fxprune.passes.pipeline.record_plan`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.fx as fx

from fxprune.core.channels import Dropped
from fxprune.core.analysis import Analysis
from fxprune.stages import PruneResult, analyze, drop_from_plan
from fxprune.core.capture import graph_level
from fxprune.errors import CalibrationError, InvalidOptionError
from fxprune.core.meta import PRUNED_PLAN_KEY, REPORTS_KEY
from fxprune.passes.pipeline import Pass, bind_run_data, placeholder_zeros, run_data
from fxprune.core.plan import Plan
from fxprune.data.recovery import RECOVERY_STEPS, RecoveryReport

@dataclass(frozen=True)
class RecoveryPass(Pass):
    """Base of the recovery passes (not registered itself): options are typed fields as for any pass;
    the calibration data, and for the passes that compare with the original model the graph before
    pruning (``source``), are bound when the pass runs — by ``Pipeline(...)(gm, calibration=loader)``,
    which hands each recovery pass the graph that the last pruning pass received, or directly::

        Reconstruct().with_calibration(loader, source=original_gm)(pruned_gm)

    A bound pass equals and prints as the unbound one (the data is not an option). Each run returns a
    new GraphModule whose ``meta[REPORTS_KEY]`` lists the reports of every recovery pass so far.
    """

    needs_calibration: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.name not in RECOVERY_STEPS:  # a recovery pass runs the step of its name
            raise ValueError(f"recovery pass {cls.__qualname__} is named {cls.name!r}, which is no step of "
                             f"fxprune.data.recovery.RECOVERY_STEPS ({list(RECOVERY_STEPS)})")

    def with_calibration(self, calibration: Any, source: Any = None) -> "RecoveryPass":
        """This pass with its run-time data bound: ``calibration`` (any iterable of batches, or a
        :class:`~fxprune.data.calibration.Calibration`) and ``source`` (the GraphModule before pruning, or
        the :class:`~fxprune.stages.PruneResult`)."""
        return bind_run_data(self, calibration, source)

    def apply(self, gm: fx.GraphModule) -> fx.GraphModule:
        return self.run(gm)[0]

    def run(self, gm: fx.GraphModule) -> tuple[fx.GraphModule, RecoveryReport]:
        """The new GraphModule and the report of what changed."""
        calibration, source = run_data(self).calibration, run_data(self).source
        if calibration is None:
            raise CalibrationError(f"pass {self.name!r} needs calibration data: run the pipeline as "
                                   f"pipeline(gm, calibration=loader), or bind it with "
                                   f"{type(self).__name__}(...).with_calibration(loader, source=...)")
        step = RECOVERY_STEPS[self.name]  # the record this pass is named after
        analysis, drop = _source(self, source, gm) if step.needs_source else (None, None)
        new, report = step.run(analysis, drop, gm, calibration, False, **self.options(include_defaults=True))
        new.meta[REPORTS_KEY] = tuple(gm.meta.get(REPORTS_KEY, ())) + (report,)
        return new, report


def _source(p: RecoveryPass, source: Any, pruned: fx.GraphModule) -> tuple[Analysis, Dropped]:
    """The original model's analysis and the dropped classes, from a PruneResult or from the graph
    before pruning plus the plan the pruning pass recorded on ``pruned``."""
    if isinstance(source, PruneResult):
        return source.analysis, source.drop
    if not isinstance(source, fx.GraphModule):
        raise InvalidOptionError(f"pass {p.name!r} compares with the model before pruning: give it as "
                                 f"source= (a GraphModule or a PruneResult), got {type(source).__name__}; "
                                 f"in a pipeline, put a pruning pass (prune-channels, apply-plan) before it")
    text = pruned.meta.get(PRUNED_PLAN_KEY)
    if text is None:
        raise InvalidOptionError(f"pass {p.name!r}: the graph carries no pruning plan "
                                 f"(meta[{PRUNED_PLAN_KEY!r}]); run prune-channels or apply-plan before it")
    plan = Plan.from_json(text)
    analysis = analyze(source, placeholder_zeros(source), plan.options.replace(capture=graph_level(source)))
    return analysis, drop_from_plan(analysis, plan)
