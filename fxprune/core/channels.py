"""Channel ids and the constraints between them.

Every channel that a producer opens (a conv's output channel, an embedding dimension, an LSTM hidden
unit, a parameter's slice) gets an integer id. Analysis records only three kinds of fact about ids:

- ``unify(a, b)``: position i of ``a`` and of ``b`` hold the same channel (residual add, BN after conv,
  the columns of a channel shuffle), so they are kept or dropped together;
- ``freeze(a, reason)``: these channels must stay (an op without a rule, a graph output);
- ``approximate(a, reason)``: dropping these is not exact (LayerNorm statistics).

:meth:`ChannelTable.solve` turns those facts into equivalence classes once, at the end, with a vectorised
union-find (hooking onto the smaller root, then pointer jumping), so analysis cost stays linear in the
number of ids. A tensor's channel map is a tuple with one entry per dim: ``None`` for a dim that carries
no channel (batch, spatial, an input's features), else an int64 tensor of ids, one per position, where
``-1`` marks a fixed position (for example the class token concatenated onto a sequence).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping, Optional, Sequence

import torch

#: One entry per dim of a tensor: None (no channel) or ids per position (-1 = fixed position).
TensorIds = tuple[Optional[torch.Tensor], ...]


@dataclass(frozen=True)
class Solution:
    """Equivalence classes of ids: ``root[id]`` is the smallest id of its class."""

    root: torch.Tensor
    frozen: torch.Tensor  # bool per id, true on roots of frozen classes
    approximate: torch.Tensor  # bool per id, true on roots of approximate classes
    reasons: Mapping[int, str]  # root -> first reason it was frozen (read-only)

    def __post_init__(self) -> None:
        object.__setattr__(self, "reasons", MappingProxyType(dict(self.reasons)))

    def classes(self, ids: torch.Tensor) -> torch.Tensor:
        """Class of each position (-1 stays -1)."""
        out = torch.full_like(ids, -1)
        valid = ids >= 0
        out[valid] = self.root[ids[valid]]
        return out


@dataclass(frozen=True)
class Dropped:
    """The channel classes a selection drops: ``mask[c]`` is True on the root id ``c`` of every dropped
    class of a :class:`Solution` (all ids of a class go with their root). What select returns, a plan
    implies, and rewrite, verify and recovery read.

    >>> dropped = Dropped(torch.tensor([False, True, False]))
    >>> dropped.any(), dropped.indices().tolist(), dropped.count_of([0, 1])
    (True, [1], 1)
    """

    mask: torch.Tensor

    def __post_init__(self) -> None:
        if self.mask.dtype != torch.bool or self.mask.dim() != 1:
            raise TypeError(f"Dropped holds a 1-D bool mask over channel ids, got {self.mask.dtype} of shape "
                            f"{tuple(self.mask.shape)}")

    @classmethod
    def nothing(cls, ids: int) -> "Dropped":
        """No class dropped, over ``ids`` channel ids."""
        return cls(torch.zeros(ids, dtype=torch.bool))

    def __getitem__(self, ids) -> torch.Tensor:
        """Whether each of ``ids``' classes is dropped (``ids`` are roots or any index form torch takes)."""
        return self.mask[ids]

    def __len__(self) -> int:
        return self.mask.numel()

    def any(self) -> bool:
        return bool(self.mask.any())

    def indices(self) -> torch.Tensor:
        """The root ids of the dropped classes."""
        return self.mask.nonzero().flatten()

    def count_of(self, units: Sequence[int]) -> int:
        """How many of a group's ``units`` (root ids) are dropped."""
        return int(self.mask[torch.as_tensor(list(units), dtype=torch.long)].sum()) if len(units) else 0


@dataclass
class ChannelTable:
    """Allocates ids and collects unify / freeze / approximate facts about them."""

    size: int = 0
    _left: list[torch.Tensor] = field(default_factory=list)
    _right: list[torch.Tensor] = field(default_factory=list)
    _frozen: list[tuple[torch.Tensor, str]] = field(default_factory=list)
    _approx: list[torch.Tensor] = field(default_factory=list)

    def fresh(self, n: int) -> torch.Tensor:
        ids = torch.arange(self.size, self.size + n, dtype=torch.long)
        self.size += n
        return ids

    def unify(self, a: torch.Tensor, b: torch.Tensor, reason: str) -> None:
        """Tie a[i] to b[i]; a fixed position (-1) on one side freezes the other."""
        if a.shape != b.shape:
            raise AssertionError(f"unify of {tuple(a.shape)} and {tuple(b.shape)} ({reason})")
        both = (a >= 0) & (b >= 0)
        if both.any():
            pa, pb = a[both], b[both]
            differ = pa != pb
            if differ.any():
                self._left.append(pa[differ])
                self._right.append(pb[differ])
        self.freeze(a[(a >= 0) & (b < 0)], reason)
        self.freeze(b[(b >= 0) & (a < 0)], reason)

    def freeze(self, ids: Optional[torch.Tensor], reason: str) -> None:
        if ids is not None and ids.numel() and bool((ids >= 0).any()):
            self._frozen.append((ids[ids >= 0].flatten(), reason))

    def approximate(self, ids: Optional[torch.Tensor]) -> None:
        if ids is not None and ids.numel():
            self._approx.append(ids[ids >= 0].flatten())

    def solve(self) -> Solution:
        root = _components(self.size, _cat(self._left), _cat(self._right))
        frozen = torch.zeros(self.size, dtype=torch.bool)
        reasons: dict[int, str] = {}
        for ids, reason in self._frozen:
            roots = root[ids].unique()
            for r in roots[~frozen[roots]].tolist():
                reasons[r] = reason
            frozen[roots] = True
        approx = torch.zeros(self.size, dtype=torch.bool)
        if self._approx:
            approx[root[_cat(self._approx)]] = True
        return Solution(root, frozen, approx, reasons)


def _cat(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat(list(parts)) if parts else torch.zeros(0, dtype=torch.long)


def _components(n: int, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Union-find over edges (a[i], b[i]); returns the smallest id of each id's class.

    Only ids that appear in an edge take part (most ids, such as kernel dims, never do): they are
    renumbered in increasing order, so "smallest local index" is still "smallest id".
    """
    root = torch.arange(n, dtype=torch.long)
    if a.numel() == 0:
        return root
    touched, local = torch.unique(torch.cat([a, b]), return_inverse=True)
    parent = _local_components(touched.numel(), local[: a.numel()], local[a.numel():])
    root[touched] = touched[parent]
    return root


def _local_components(n: int, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    parent = torch.arange(n, dtype=torch.long)
    while True:
        parent = _compress(parent)
        ra, rb = parent[a], parent[b]
        differ = ra != rb
        if not differ.any():
            return parent
        lo = torch.minimum(ra, rb)[differ]
        hi = torch.maximum(ra, rb)[differ]
        # Every hi is a root; hook it onto the smallest root it meets. parent[i] <= i always holds.
        parent.scatter_reduce_(0, hi, lo, reduce="amin")


def _compress(parent: torch.Tensor) -> torch.Tensor:
    while True:
        grand = parent[parent]
        if torch.equal(grand, parent):
            return parent
        parent = grand
