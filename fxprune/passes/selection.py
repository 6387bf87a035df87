"""The selection options ``prune-channels`` and ``mask-channels`` share: how channels are chosen.

Both passes select exactly as :func:`fxprune.prune` does; declaring the options once keeps their
names, defaults, docs and checks the same in both.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from fxprune.core.analysis import Analysis
from fxprune.errors import InvalidOptionError
from fxprune.options import PruneOptions
from fxprune.data.criteria import CRITERIA, DATA_CRITERIA, DEFAULT_CRITERION, GRADIENT_CRITERIA, \
    check_criterion, gather_evidence, score_groups
from fxprune.passes.pipeline import Pass, bind_run_data, run_data
from fxprune.core.select import Policy

#: Criteria a pass can use: ``taylor`` and ``hessian`` need a loss function, which a pass option
#: cannot hold (use :func:`fxprune.prune` with ``loss_fn=``). The activation criteria read the
#: calibration data a pipeline is run with: ``pipeline(gm, calibration=loader)``.
PASS_CRITERIA = tuple(c for c in CRITERIA if c not in GRADIENT_CRITERIA)


@dataclass(frozen=True)
class SelectionOptions(Pass):
    """Base of the passes that select channels by importance (not registered itself)."""

    sparsity: float = 0.5
    """Fraction of each group's units to drop, in [0, 1)."""
    criterion: str = DEFAULT_CRITERION
    """Importance: a name from :data:`PASS_CRITERIA` (``activation``, ``wanda`` and ``flap`` read
    calibration data: bind it with :meth:`with_calibration`, or run the pipeline with it)."""
    reduce: str = "mean"
    """How a unit's scores over several members combine: ``mean``, ``sum`` or ``max``."""
    global_ranking: bool = False
    """Rank the units of all groups together (scores normalised per group) instead of per group."""
    round_to: int = 1
    """Kept counts are rounded up to a multiple of this."""
    min_keep: int = 1
    """No group (and no tensor dim it spans) keeps fewer units than this."""
    ignore: tuple[str, ...] = ()
    """fnmatch patterns of module names whose groups are left whole."""
    seed: int = 0
    """Seed of the ``random`` criterion."""
    split_axis: str = "largest"
    """Which axis carries the channels when a view splits a channel dim (``largest`` or ``outer``)."""
    normalize: str = "mean"
    """How global ranking compares groups: ``mean``, ``none``, ``max``, ``standardize`` or ``lamp``."""
    min_keep_ratio: float = 0.0
    """Every group keeps at least this fraction of its units."""

    @property
    def needs_calibration(self) -> bool:  # type: ignore[override]
        """True when the criterion reads activations: the pass then needs calibration data."""
        return self.criterion in DATA_CRITERIA

    @property
    def calibration(self) -> Any:
        """The calibration data bound with :meth:`with_calibration` (None if none)."""
        return run_data(self).calibration

    def with_calibration(self, calibration: Any, source: Any = None) -> "SelectionOptions":
        """This pass with ``calibration`` batches bound (not an option: data is given at run time).

        >>> PruneChannels(sparsity=0.5, criterion="wanda").with_calibration(loader)(gm)  # doctest: +SKIP
        """
        return bind_run_data(self, calibration, source)

    def scores(self, analysis: Analysis) -> dict[str, torch.Tensor]:
        """Each prunable group's scores under these options (reading the bound calibration data)."""
        evidence = gather_evidence(analysis, self.criterion, self.calibration)
        return score_groups(analysis, analysis.groups, self.criterion, self.reduce, self.seed, evidence=evidence)

    def validate(self) -> None:
        if self.criterion not in PASS_CRITERIA:
            raise InvalidOptionError(f"criterion {self.criterion!r} is not a {self.name} option; "
                                     f"expected one of {list(PASS_CRITERIA)}")
        check_criterion(self.criterion, self.reduce)
        self.policy()
        if self.split_axis not in ("largest", "outer"):
            raise InvalidOptionError(f"split_axis must be 'largest' or 'outer', got {self.split_axis!r}")

    def prune_options(self, level: str) -> PruneOptions:
        """The plan's record of these options (the same value :func:`fxprune.prune` records)."""
        return PruneOptions(self.sparsity, self.criterion, level, self.reduce, self.global_ranking, self.round_to,
                            self.min_keep, tuple(self.ignore), self.normalize, self.min_keep_ratio,
                            split_axis=self.split_axis, seed=self.seed)

    def policy(self) -> Policy:
        """The selection policy these options describe (checks sparsity, round_to, min_keep, ignore)."""
        return Policy(self.sparsity, self.global_ranking, self.round_to, self.min_keep, self.ignore,
                      self.normalize, self.min_keep_ratio)
