"""The selection options ``prune-channels`` and ``mask-channels`` share, derived from
:class:`~fxprune.options.PruneOptions`: the same names, defaults, help and checks as :func:`fxprune.prune`.

A pass works at its graph's own level, so ``capture`` is not a pass option; a pass spec writes one
``sparsity`` for every group (a float: ``{pattern: ratio}`` needs :func:`fxprune.prune`); and a pass
whose route cannot honour an option does not declare it (``mask-channels`` has no ``prune_outputs`` or
``propagate_bias``: its masks keep every shape; no selecting pass has the options only :mod:`fxprune.hf`
honours, whole layers being the ``drop-blocks`` pass's), so giving one is an error naming it.
"""
from __future__ import annotations

import dataclasses
import typing
from typing import Any

import torch

from fxprune.core.analysis import Analysis
from fxprune.data.criteria import DATA_CRITERIA, GRADIENT_CRITERIA, check_criterion
from fxprune.errors import InvalidOptionError
from fxprune.options import PruneOptions, public_fields, route_fields
from fxprune.passes.pipeline import Pass, bind_run_data, run_data
from fxprune.stages import score

#: Options no selecting pass takes: a pass works at the level of the graph it is given, and removes
#: channels, not whole layers or experts (``drop-blocks`` declares the block options as its own).
NOT_PASS_OPTIONS = ("capture", *route_fields())


def option_fields(exclude: tuple[str, ...] = ()) -> list[tuple[str, Any, dataclasses.Field]]:
    """``PruneOptions``' fields as pass fields (``make_dataclass`` form), less ``exclude``."""
    hints = typing.get_type_hints(PruneOptions)
    out = []
    for name, f in public_fields().items():
        if name in NOT_PASS_OPTIONS + exclude:
            continue
        kind = float if name == "sparsity" else hints[name]
        out.append((name, kind, dataclasses.field(default=f.default, metadata=f.metadata)))
    return out


class _Selection(Pass):
    """What a selecting pass does with its options (the fields come from :func:`option_fields`)."""

    @property
    def needs_calibration(self) -> bool:  # type: ignore[override]
        """True when the criterion reads activations: the pass then needs calibration data."""
        return self.criterion in DATA_CRITERIA

    @property
    def calibration(self) -> Any:
        """The calibration data bound with :meth:`with_calibration` (None if none)."""
        return run_data(self).calibration

    def with_calibration(self, calibration: Any, source: Any = None) -> "_Selection":
        """This pass with ``calibration`` batches bound (not an option: data is given at run time).

        >>> PruneChannels(sparsity=0.5, criterion="wanda").with_calibration(loader)(gm)  # doctest: +SKIP
        """
        return bind_run_data(self, calibration, source)

    def prune_options(self, level: str = "fx") -> PruneOptions:
        """These options as the :class:`PruneOptions` a plan records (checked there, once)."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name in public_fields()}
        return PruneOptions(capture=level, **fields)

    def scores(self, analysis: Analysis) -> dict[str, torch.Tensor]:
        """Each prunable group's scores under these options (reading the bound calibration data)."""
        return score(analysis, self.prune_options(analysis.level), data=run_data(self))

    def validate(self) -> None:
        """``taylor`` and ``hessian`` need a loss function, which a pass option cannot hold; the
        activation criteria read the data a pipeline is run with: ``pipeline(gm, calibration=loader)``."""
        if self.criterion in GRADIENT_CRITERIA:
            raise InvalidOptionError(f"criterion {self.criterion!r} is not a {self.name} option: it needs a "
                                     f"loss function; use fxprune.prune(..., loss_fn=...)")
        check_criterion(self.criterion, self.reduce)
        self.prune_options()


def selection_options(name: str, exclude: tuple[str, ...] = ()) -> type:
    """The frozen base dataclass of a selecting pass: its options are ``PruneOptions``' fields."""
    return dataclasses.make_dataclass(name, option_fields(exclude), bases=(_Selection,), frozen=True,
                                      namespace={"__module__": __name__})
