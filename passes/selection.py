"""The selection options ``prune-channels`` and ``mask-channels`` share: how channels are chosen.

Both passes select exactly as :func:`fxprune.prune` does; declaring the options once keeps their
names, defaults, docs and checks the same in both.
"""
from __future__ import annotations

from dataclasses import dataclass

from fxprune.errors import InvalidOptionError
from fxprune.importance import CRITERIA, check_criterion
from fxprune.pipeline import Pass
from fxprune.select import Policy

#: Criteria a pass can use: ``taylor`` needs a loss and a batch, which a pass does not have.
PASS_CRITERIA = tuple(c for c in CRITERIA if c != "taylor")


@dataclass(frozen=True)
class SelectionOptions(Pass):
    """Base of the passes that select channels by importance (not registered itself)."""

    sparsity: float = 0.5
    """Fraction of each group's units to drop, in [0, 1)."""
    criterion: str = "l1"
    """Importance: ``l1``, ``l2``, ``fpgm``, ``bn_scale`` or ``random``."""
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

    def validate(self) -> None:
        if self.criterion not in PASS_CRITERIA:
            raise InvalidOptionError(f"criterion {self.criterion!r} is not a {self.name} option; "
                                     f"expected one of {list(PASS_CRITERIA)}")
        check_criterion(self.criterion, self.reduce)
        self.policy()
        if self.split_axis not in ("largest", "outer"):
            raise InvalidOptionError(f"split_axis must be 'largest' or 'outer', got {self.split_axis!r}")

    def policy(self) -> Policy:
        """The selection policy these options describe (checks sparsity, round_to, min_keep, ignore)."""
        return Policy(self.sparsity, self.global_ranking, self.round_to, self.min_keep, self.ignore)
