"""Select: scores and the options (:class:`~fxprune.options.PruneOptions`) become the set of dropped channel classes.

Per group, the lowest-scoring units go first (ties broken by unit order, so selection is deterministic)
until the group's ratio is met, subject to ``min_keep`` (never below, per group and per tensor dim the
group spans: a channel-split half never empties), ``round_to`` (kept *channels* a multiple of N: a unit
that spans several channels, such as an attention head of ``head_dim`` channels, counts as that many) and
frozen units. ``global_ranking`` ranks units of all groups together on scores normalised per group
(``normalize``: ``mean`` by default, ``none``, ``max``, ``standardize`` or ``lamp``), which gives each
group its own ratio — FLAP's adaptive per-layer ratios with ``normalize="standardize"`` — bounded
below by ``min_keep_ratio`` (the fraction of its units every group keeps) and ``min_keep``. The pieces
of a ``chunk`` keep equal sizes: their units drop in lockstep (:mod:`fxprune.core.lockstep`), a whole
step at a time, each piece losing its own lowest-scoring channels; a group made only of such units drops
a whole number of steps (with ``round_to`` still met, which may drop fewer).

>>> options = PruneOptions(0.5, global_ranking=True, normalize="standardize", min_keep_ratio=0.2)
>>> adaptive_ratios(analysis, scores, options)                     # doctest: +SKIP
{'conv1': 0.25, 'layer1.0.conv1': 0.625, ...}
"""
from __future__ import annotations

import fnmatch
import math
from collections import Counter
from typing import Mapping, Optional

import torch

from fxprune.core.analysis import Analysis
from fxprune.core.channels import Dropped
from fxprune.errors import InvalidOptionError
from fxprune.core.groups import Group
from fxprune.core.lockstep import Lockstep
from fxprune.options import NORMALIZATIONS, PruneOptions, Sparsity

def module_names(group: Group) -> list[str]:
    """The producer modules of a group (parameter keys without their last part)."""
    return [m.key.rsplit(".", 1)[0] for m in group.members if m.producer]


def _matches(pattern: str, names: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(n, pattern) for n in names)


def check_patterns(groups: tuple[Group, ...], options: PruneOptions) -> None:
    """A ratio or ignore pattern that matches no module is a typo: say so."""
    names = [n for g in groups for n in module_names(g)] + [m.key.rsplit(".", 1)[0] for g in groups
                                                            for m in g.members]
    patterns = list(options.ignore) + (list(options.sparsity) if isinstance(options.sparsity, Mapping) else [])
    for pattern in patterns:
        if not _matches(pattern, names):
            raise InvalidOptionError(f"pattern {pattern!r} matches no prunable module; known modules "
                                     f"include {sorted(set(names))[:8]}")


def group_ratio(group: Group, options: PruneOptions) -> float:
    names = module_names(group)
    if any(_matches(p, names) for p in options.ignore):
        return 0.0
    if not isinstance(options.sparsity, Mapping):
        return float(options.sparsity)
    ratios = [r for p, r in options.sparsity.items() if _matches(p, names)]
    return max(ratios) if ratios else 0.0


def select(analysis: Analysis, scores: Mapping[str, torch.Tensor], options: PruneOptions,
           counts: Optional[Mapping[str, int]] = None) -> Dropped:
    """The dropped classes (:class:`~fxprune.core.channels.Dropped`). ``counts`` ({group name: units to
    drop}) overrides the options' count for those groups (an adapter that imposes one width per layer
    kind, such as :mod:`fxprune.hf`)."""
    drop = torch.zeros(analysis.solution.root.numel(), dtype=torch.bool)
    segments = _segments(analysis)
    holding = _segments_of_units(segments)
    budgets = _global_budgets(analysis, scores, options) if options.global_ranking else {}
    locks = locksteps_by_group(analysis)
    for group in analysis.groups:
        if group.name not in scores:
            continue
        ratio = budgets[group.name] / group.size if group.name in budgets else group_ratio(group, options)
        mine_locks = locks.get(group.name, ())
        count = _drop_count(group, ratio, options, unit_width(analysis, group),  # global shares get round_to too
                            _granularity(group, mine_locks))
        count = counts.get(group.name, count) if counts else count
        mine = [segments[i] for i in sorted({i for u in group.units for i in holding.get(u, ())})]
        for unit in _choose(group, scores[group.name], count, mine, options.min_keep, mine_locks):
            drop[unit] = True
    return Dropped(drop)


def _drop_count(group: Group, ratio: float, options: PruneOptions, width: int, granularity: int = 1) -> int:
    keep = group.size - math.floor(ratio * group.size + 1e-9)
    keep = round_up_units(keep, options.round_to, width)
    keep = min(group.size, max(options.min_keep, _min_keep_of(group, options), keep))
    drops = max(0, group.size - max(keep, len(group.frozen_units)))
    if granularity == 1:
        return drops
    most = group.size - max(options.min_keep, _min_keep_of(group, options), len(group.frozen_units))
    return _whole_steps(drops, most, granularity, group.size, options.round_to, width)


def _whole_steps(drops: int, most: int, granularity: int, size: int, round_to: int, width: int) -> int:
    """The drop count nearest ``drops`` (at most ``most``; the lower one on a tie) that is a whole number
    of lockstep steps and keeps ``round_to`` met: a group made only of a chunk's pieces.

    >>> _whole_steps(7, 20, 8, 24, 1, 1), _whole_steps(9, 31, 2, 32, 1, 1), _whole_steps(9, 31, 2, 32, 8, 1)
    (8, 8, 8)
    """
    def whole(d: int) -> bool:
        return d % granularity == 0 and round_up_units(size - d, round_to, width) == size - d

    down = next((d for d in range(drops, -1, -1) if whole(d)), 0)
    up = next((d for d in range(drops, most + 1) if whole(d)), None)
    return up if up is not None and up - drops < drops - down else down


def locksteps_by_group(analysis: Analysis) -> dict[str, tuple[Lockstep, ...]]:
    """Each group's locksteps (build_groups puts all of a lockstep's units in one group)."""
    owner = {u: g.name for g in analysis.groups for u in g.units} if analysis.locksteps else {}
    out: dict[str, tuple[Lockstep, ...]] = {}
    for lock in analysis.locksteps:
        name = owner[lock.units[0]]
        out[name] = out.get(name, ()) + (lock,)
    return out


def _granularity(group: Group, locks: tuple[Lockstep, ...]) -> int:
    """Units a group's drops come in: a step's size when every free unit is in a lockstep, else 1."""
    if not locks:
        return 1
    locked = {u for lock in locks for u in lock.units}
    if any(u not in locked for u in set(group.units) - set(group.frozen_units)):
        return 1
    return math.gcd(*(lock.size for lock in locks))


def round_up_units(keep: int, round_to: int, width: int = 1) -> int:
    """``keep`` units raised until they hold a multiple of ``round_to`` channels, each unit being ``width``
    channels: kernels want channel counts aligned, and 6 heads of 64 channels already are.

    >>> round_up_units(6, 16), round_up_units(6, 16, width=64), round_up_units(5, 16, width=12)
    (16, 6, 8)
    """
    step = round_to // math.gcd(round_to, width)
    return -(-keep // step) * step


def unit_width(analysis: Analysis, group: Group) -> int:
    """Channels per unit in the group's first producer dim (1 unless units are tied channel sets, such
    as whole attention heads)."""
    producer = next((m for m in group.members if m.producer), None)
    dims = analysis.params.get(analysis.canonical(producer.key)) if producer else None
    ids = dims[producer.dim] if dims is not None else None
    if ids is None:
        return 1
    ids = ids[ids >= 0]
    classes = analysis.solution.root[ids].unique().numel()
    return ids.numel() // classes if classes and ids.numel() % classes == 0 else 1


def _choose(group: Group, scores: torch.Tensor, count: int, mine: list, min_keep: int,
            locks: tuple[Lockstep, ...] = ()) -> list[int]:
    """The ``count`` lowest-scoring free units, never emptying a segment (of ``mine``, the segments
    holding any of the group's units, in segment order) below ``min_keep``.

    A first pass also keeps every segment (a tensor dim the group spans, like one half of a split)
    at least as full as the group's overall keep ratio, so a split's halves shrink alike; a second pass
    fills what remains of the budget with only ``min_keep`` as the bound. Units in a lockstep (a chunk's
    pieces) go a whole step at a time (:func:`_items`), never beyond ``count``.
    """
    items = _items(group, scores.tolist(), set(group.frozen_units), locks)
    of_unit: dict[int, list[int]] = {}
    for index, segment in enumerate(mine):
        for unit in segment:
            of_unit.setdefault(unit, []).append(index)
    kept = [len(s) for s in mine]
    keep_ratio = 1 - count / max(group.size, 1)
    balanced = [max(min(min_keep, len(s)), int(len(s) * keep_ratio)) for s in mine]
    floors = [min(min_keep, len(s)) for s in mine]
    chosen: dict[int, None] = {}  # insertion-ordered set
    for bound in (balanced, floors):
        for item in items:
            if len(chosen) == count:
                return list(chosen)
            if item[0] in chosen or len(chosen) + len(item) > count:
                continue
            touched = dict.fromkeys(of_unit.get(item[0], ()), 1) if len(item) == 1 else \
                Counter(i for unit in item for i in of_unit.get(unit, ()))
            if any(kept[i] - n < bound[i] for i, n in touched.items()):
                continue
            for i, n in touched.items():
                kept[i] -= n
            chosen.update(dict.fromkeys(item))
    return list(chosen)


def _items(group: Group, values: list[float], frozen: set, locks: tuple[Lockstep, ...]) -> list[tuple[int, ...]]:
    """What selection drops, lowest score first (ties by unit order): each free unit alone, except
    those in a lockstep, which go one step at a time — step ``t`` takes the ``t``-th lowest-scoring
    ``steps[c]`` units of every cell ``c``, so each piece loses its own least important channels —
    ranked by the mean score of its units (non-decreasing in ``t``)."""
    index = {u: i for i, u in enumerate(group.units)}

    def key(unit: int) -> tuple[float, int]:
        return values[index[unit]], index[unit]

    ranked, locked = [], set()
    for lock in locks:
        cells = [sorted((u for u in cell if u not in frozen), key=key) for cell in lock.cells]
        locked.update(lock.units)
        for t in range(min(len(c) // s for c, s in zip(cells, lock.steps))):
            units = tuple(u for c, s in zip(cells, lock.steps) for u in c[t * s:(t + 1) * s])
            mean = sum(values[index[u]] for u in units) / len(units)
            ranked.append(((mean, min(index[u] for u in units)), units))
    ranked += [(key(u), (u,)) for u in group.units if u not in locked and u not in frozen]
    return [units for _, units in sorted(ranked, key=lambda entry: entry[0])]


def _segments(analysis: Analysis) -> list[frozenset]:
    """The distinct sets of classes that some tensor dim holds: none may lose all its channels."""
    seen: dict[frozenset, None] = {}
    root = analysis.solution.root
    for ids in analysis.id_arrays():
        valid = ids[ids >= 0]
        if valid.numel():
            seen.setdefault(frozenset(root[valid].unique().tolist()), None)
    return list(seen)


def _segments_of_units(segments: list[frozenset]) -> dict[int, list[int]]:
    """unit -> indices of the segments holding it (one pass, instead of testing every segment per group)."""
    holding: dict[int, list[int]] = {}
    for index, segment in enumerate(segments):
        for unit in segment:
            holding.setdefault(unit, []).append(index)
    return holding


def _global_budgets(analysis: Analysis, scores: Mapping[str, torch.Tensor], options: PruneOptions) -> dict:
    """Rank all units together on normalised scores; each group's share of the drops."""
    entries = []
    for group in analysis.groups:
        if group.name in scores and group_ratio(group, options) > 0:
            norm = normalize_scores(scores[group.name], options.normalize)
            entries += [(v, group.name, i) for i, v in enumerate(norm.tolist())]
    total = sum(g.size for g in analysis.groups if g.name in scores and group_ratio(g, options) > 0)
    if isinstance(options.sparsity, Mapping):  # the mapping's groups share the drops it asks for in all
        budget = sum(math.floor(group_ratio(g, options) * g.size + 1e-9) for g in analysis.groups if g.name in scores)
    else:
        budget = math.floor(float(options.sparsity) * total + 1e-9)
    counts: dict[str, int] = {g.name: 0 for g in analysis.groups}
    sizes = {g.name: g.size - max(options.min_keep, _min_keep_of(g, options), len(g.frozen_units))
             for g in analysis.groups}
    for _, name, _ in sorted(entries):
        if budget == 0:
            break
        if counts[name] < sizes[name]:
            counts[name] += 1
            budget -= 1
    return counts


def _min_keep_of(group: Group, options: PruneOptions) -> int:
    return math.ceil(options.min_keep_ratio * group.size - 1e-9)


def normalize_scores(scores: torch.Tensor, how: str) -> torch.Tensor:
    """One group's scores on a scale comparable across groups (order within the group unchanged).

    ``lamp``: each score over the sum of the scores at least as large (LAMP, Lee et al. 2021), so a
    group's least important unit always scores lowest against the whole group.

    >>> normalize_scores(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64), "lamp")
    tensor([0.1667, 0.4000, 1.0000], dtype=torch.float64)
    """
    s = scores.double()
    if how == "none":
        return s
    if how == "mean":
        return s / s.mean().clamp_min(1e-12)
    if how == "max":
        return s / s.max().clamp_min(1e-12)
    if how == "standardize":
        return (s - s.mean()) / s.std(unbiased=False).clamp_min(1e-12)
    if how == "lamp":
        order = torch.argsort(s, descending=True, stable=True)
        lamp = torch.empty_like(s)
        lamp[order] = s[order] / torch.cumsum(s[order], 0).clamp_min(1e-12)
        return lamp
    raise InvalidOptionError(f"normalize must be one of {NORMALIZATIONS}, got {how!r}")


def adaptive_ratios(analysis: Analysis, scores: Mapping[str, torch.Tensor], options: PruneOptions) -> dict[str, float]:
    """The fraction of its units each scored group loses under ``options`` (global ranking gives each
    group its own; ``round_to`` and the keep bounds applied)."""
    budgets = _global_budgets(analysis, scores, options) if options.global_ranking else {}
    locks = locksteps_by_group(analysis)
    out = {}
    for group in analysis.groups:
        if group.name in scores:
            ratio = budgets[group.name] / group.size if group.name in budgets else group_ratio(group, options)
            granularity = _granularity(group, locks.get(group.name, ()))
            out[group.name] = _drop_count(group, ratio, options, unit_width(analysis, group), granularity) / group.size
    return out
