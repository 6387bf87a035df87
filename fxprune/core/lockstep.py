"""Lockstep: units dropped in fixed proportions, so that the pieces of a ``chunk`` stay equal.

``y.chunk(n, dim)`` splits at ``size // n``. After pruning, the code that runs it — the user's own
forward, which :mod:`fxprune.module` keeps, or a graph that still reads ``chunk`` — splits where the
plan's pieces end only if every piece kept the same number of channels (YOLO's C2f,
``list(self.cv1(x).chunk(2, 1))``; ShuffleNetV2's ``x.chunk(2, dim=1)``). The chunk rule records its
pieces (:class:`Pieces`: per-position ids); once the classes are solved, :func:`settle` turns them into
equations over *cells* — the free units that sit in the same pieces with the same widths —
``sum_c width(c, piece i) * drops(c)`` equal for every piece ``i``. Units that sit alike in every piece
(a unit tied across the halves) keep the pieces equal whatever happens to them and join no cell.

Cells linked by an equation form a component. Where the component's equations leave exactly one
direction of solutions, in which every cell moves the same way, the component becomes a
:class:`Lockstep`: each step drops ``steps[c]`` units of cell ``c``, every cell its own lowest-scoring
ones (select's job), so any number of steps keeps every piece equal. A component with no such direction
(none, more than one, or one that would need a cell to grow) freezes with the reason: a chunk is never
left to split in the wrong place. Cells that the direction leaves still (a zero step) freeze too.

>>> lock = Lockstep(cells=((3, 4, 5, 6), (7, 8, 9, 10)), steps=(1, 1), where=("node 'chunk'",))
>>> lock.units
(3, 4, 5, 6, 7, 8, 9, 10)
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Optional, Sequence

import torch

from fxprune.core.channels import Solution


@dataclass(frozen=True)
class Pieces:
    """What a ``chunk`` recorded: the ids of each piece's positions along the split dim."""

    arrays: tuple[torch.Tensor, ...]
    """One id array per piece, all of one length (``-1``: a fixed position)."""
    where: str
    """The node, as reasons name it."""


@dataclass(frozen=True)
class Lockstep:
    """Cells of units that drop together: one step drops ``steps[c]`` units of ``cells[c]``."""

    cells: tuple[tuple[int, ...], ...]
    """Root ids of the free units of each cell, sorted."""
    steps: tuple[int, ...]
    """Units each cell loses per step (coprime, all positive)."""
    where: tuple[str, ...]
    """The chunks whose pieces it keeps equal."""

    @property
    def units(self) -> tuple[int, ...]:
        return tuple(u for cell in self.cells for u in cell)

    @property
    def size(self) -> int:
        """Units one step drops."""
        return sum(self.steps)


def settle(pieces: Sequence[Pieces], solution: Solution) -> tuple[Solution, tuple[Lockstep, ...]]:
    """The locksteps that keep every recorded chunk's pieces equal, and ``solution`` with the units no
    lockstep can move frozen (the reason names the chunk)."""
    signatures = _signatures(pieces, solution)
    cells: dict[tuple, list[int]] = {}
    for unit in sorted(signatures):
        cells.setdefault(signatures[unit], []).append(unit)
    keys = list(cells)
    locks, frozen = [], {}
    for component in _components(keys):
        linked = [keys[i] for i in component]
        lock, still = _lockstep(linked, [cells[key] for key in linked], pieces)
        if lock is not None:
            locks.append(lock)
        frozen.update(dict.fromkeys(still, _reason(pieces, linked)))
    return _freeze(solution, frozen), tuple(locks)


def _signatures(pieces: Sequence[Pieces], solution: Solution) -> dict[int, tuple]:
    """unit -> ((chunk index, widths per piece), ...) over the chunks whose pieces hold it unevenly."""
    out: dict[int, list] = {}
    for index, record in enumerate(pieces):
        widths: dict[int, list[int]] = {}
        for piece, ids in enumerate(record.arrays):
            classes = solution.classes(ids)
            classes = classes[classes >= 0]
            classes = classes[~solution.frozen[classes]]
            units, counts = classes.unique(return_counts=True)
            for unit, count in zip(units.tolist(), counts.tolist()):
                widths.setdefault(unit, [0] * len(record.arrays))[piece] = count
        for unit, w in widths.items():
            if len(set(w)) > 1:
                out.setdefault(unit, []).append((index, tuple(w)))
    return {unit: tuple(sig) for unit, sig in out.items()}


def _components(keys: list[tuple]) -> list[list[int]]:
    """Cells (by signature) linked by sharing a chunk, in first-seen order."""
    parent = list(range(len(keys)))
    first: dict[int, int] = {}
    for i, key in enumerate(keys):
        for chunk, _ in key:
            j = first.setdefault(chunk, i)
            a, b = _find(parent, i), _find(parent, j)
            parent[max(a, b)] = min(a, b)
    out: dict[int, list[int]] = {}
    for i in range(len(keys)):
        out.setdefault(_find(parent, i), []).append(i)
    return list(out.values())


def _find(parent: list[int], i: int) -> int:
    while parent[i] != i:
        parent[i] = parent[parent[i]]
        i = parent[i]
    return i


def _lockstep(keys: list[tuple], cells: list[list[int]], pieces: Sequence[Pieces]) \
        -> tuple[Optional[Lockstep], list[int]]:
    """The component's lockstep (or None) and the units that must stay."""
    direction = _direction(_equations(keys))
    if direction is None:
        return None, [u for cell in cells for u in cell]
    moving = [(tuple(c), s) for c, s in zip(cells, direction) if s > 0]
    still = [u for c, s in zip(cells, direction) if s == 0 for u in c]
    chunks = sorted({chunk for key in keys for chunk, _ in key})
    lock = Lockstep(tuple(c for c, _ in moving), tuple(s for _, s in moving),
                    tuple(pieces[c].where for c in chunks)) if moving else None
    return lock, still


def _equations(keys: list[tuple]) -> list[list[int]]:
    """One row per (chunk, piece after the first): the piece's drops minus the first piece's."""
    rows: dict[tuple[int, int], list[int]] = {}
    for column, key in enumerate(keys):
        for chunk, widths in key:
            for piece in range(1, len(widths)):
                row = rows.setdefault((chunk, piece), [0] * len(keys))
                row[column] = widths[piece] - widths[0]
    return list(rows.values())


def _direction(rows: list[list[int]]) -> Optional[list[int]]:
    """The one direction (smallest non-negative integers, not all zero) in which ``rows @ d = 0``; None
    when the solutions form no line or the line leaves the non-negative orthant."""
    basis = _null_space(rows, len(rows[0]) if rows else 0)
    if len(basis) != 1:
        return None
    vector = basis[0]
    if sum(vector) < 0:
        vector = [-v for v in vector]
    if any(v < 0 for v in vector):
        return None
    scale = math.lcm(*(v.denominator for v in vector))
    ints = [int(v * scale) for v in vector]
    common = math.gcd(*ints)
    return [v // common for v in ints] if common else None


def _null_space(rows: list[list[int]], columns: int) -> list[list[Fraction]]:
    """A basis of the rational null space (Gauss-Jordan over fractions: the systems are small)."""
    matrix = [[Fraction(v) for v in row] for row in rows]
    pivots: list[int] = []
    r = 0
    for c in range(columns):
        pivot = next((i for i in range(r, len(matrix)) if matrix[i][c] != 0), None)
        if pivot is None:
            continue
        matrix[r], matrix[pivot] = matrix[pivot], matrix[r]
        matrix[r] = [v / matrix[r][c] for v in matrix[r]]
        for i in range(len(matrix)):
            if i != r and matrix[i][c] != 0:
                factor = matrix[i][c]
                matrix[i] = [a - factor * b for a, b in zip(matrix[i], matrix[r])]
        pivots.append(c)
        r += 1
    basis = []
    for free in (c for c in range(columns) if c not in pivots):
        vector = [Fraction(0)] * columns
        vector[free] = Fraction(1)
        for i, c in enumerate(pivots):
            vector[c] = -matrix[i][free]
        basis.append(vector)
    return basis


def _reason(pieces: Sequence[Pieces], keys: list[tuple]) -> str:
    where = ", ".join(dict.fromkeys(pieces[chunk].where for key in keys for chunk, _ in key))
    return f"the pieces of a chunk must keep equal sizes, and no drop keeps them so at {where}"


def _freeze(solution: Solution, units: dict[int, str]) -> Solution:
    if not units:
        return solution
    frozen = solution.frozen.clone()
    reasons = dict(solution.reasons)
    for unit, reason in units.items():
        reasons.setdefault(unit, reason)
    frozen[torch.tensor(list(units), dtype=torch.long)] = True
    return Solution(solution.root, frozen, solution.approximate, reasons)


def remap(lock: Lockstep, mapping: torch.Tensor) -> Lockstep:
    """``lock`` with its unit ids passed through ``mapping`` (a copy of a repeated block)."""
    cells = tuple(tuple(sorted(mapping[torch.tensor(c, dtype=torch.long)].tolist())) for c in lock.cells)
    return Lockstep(cells, lock.steps, lock.where)
