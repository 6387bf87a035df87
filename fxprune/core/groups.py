"""Groups: the channel spaces a user prunes, as immutable values.

A group gathers the producers (conv/linear output rows, embedding dims, RNN units...) whose channels are
tied together by the graph — a residual stream, a concatenation's consumers, a shuffle — and counts its
*units*: the classes of channels that are kept or dropped as one. Frozen units (an op without a rule, a
graph output) stay, and the group says why.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Mapping, Sequence

import torch

from fxprune.core.channels import Solution, TensorIds


@dataclass(frozen=True)
class Member:
    """A parameter dim whose slices belong to a group's units."""

    key: str
    """The original ``state_dict`` key (``"layer1.0.conv1.weight"``)."""
    dim: int
    """The dim of that tensor that is sliced."""
    producer: bool
    """True where this dim creates the channels (a conv's output rows) — what scores read."""


@dataclass(frozen=True)
class Group:
    """One prunable (or frozen) channel space.

    >>> result = fxprune.prune(model, (x,), sparsity=0.5)   # doctest: +SKIP
    >>> print(result.analysis.groups[0])                     # doctest: +SKIP
    Group('conv1', 16 units, 4 members, exact)
    """

    name: str
    """The first producer's module (or parameter) name, in graph order."""
    units: tuple[int, ...]
    """Class ids of the units, sorted; internal handles used by scores and plans."""
    frozen_units: tuple[int, ...]
    """Units that must stay."""
    members: tuple[Member, ...]
    reasons: tuple[str, ...]
    """Why frozen units are frozen (distinct reasons, in order)."""
    exact: bool
    """False when a channel-mixing op (LayerNorm statistics) makes pruning approximate."""

    @property
    def size(self) -> int:
        return len(self.units)

    @property
    def prunable(self) -> bool:
        return len(self.frozen_units) < len(self.units)

    def __repr__(self) -> str:
        state = "exact" if self.exact else "approximate"
        if not self.prunable:
            state = f"frozen: {self.reasons[0] if self.reasons else '?'}"
        elif self.frozen_units:
            state += f", {len(self.frozen_units)} frozen"
        return f"Group({self.name!r}, {self.size} units, {len(self.members)} members, {state})"


def build_groups(params: Mapping[str, TensorIds], producers: Sequence[Any],
                 solution: Solution, ties: Sequence[Sequence[int]] = ()) -> tuple[Group, ...]:
    """Connect producers that share a class; each connected set is one group.

    ``params``: every parameter's channel map; ``producers``: the parameter dims that create channels
    (``.key``, ``.dim``, in graph order: the first names its group); ``solution``: the solved classes;
    ``ties``: sets of classes that one selection must see together (a lockstep's units, which may come
    from several producers: ``cat([a, b]).chunk(2)``).
    """
    roots = [solution.root[params[p.key][p.dim]] for p in producers]
    parent = list(range(len(roots)))
    owner = torch.full((solution.root.numel(),), -1, dtype=torch.long)  # first producer of each class
    for index, r in enumerate(roots):
        classes = r[r >= 0].unique()
        seen = owner[classes]
        owner[classes[seen < 0]] = index
        for other in seen[seen >= 0].unique().tolist():  # producers met before: usually none or one
            _union(parent, index, other)
    for tie in ties:
        owners = [o for o in owner[torch.as_tensor(list(tie), dtype=torch.long)].unique().tolist() if o >= 0]
        for other in owners[1:]:
            _union(parent, owners[0], other)
    by_group: dict[int, list[int]] = {}
    for index in range(len(roots)):
        by_group.setdefault(_find(parent, index), []).append(index)
    units = [torch.cat([roots[i] for i in idx]).unique() for idx in by_group.values()]
    members = _members(params, solution, units)
    groups = [_make_group(producers, solution, idx, u, m) for idx, u, m in zip(by_group.values(), units, members)]
    return tuple(_unique_names(groups))


def _unique_names(groups: list[Group]) -> list[Group]:
    """A tied weight can produce two groups from one module (an embedding shared with the LM head):
    the later ones get ``#2``, ``#3``... so a name identifies one group."""
    seen: dict[str, int] = {}
    out = []
    for group in groups:
        seen[group.name] = seen.get(group.name, 0) + 1
        out.append(group if seen[group.name] == 1 else replace(group, name=f"{group.name}#{seen[group.name]}"))
    return out


def _make_group(producers: Sequence[Any], solution: Solution, indices: list[int], units: torch.Tensor,
                members: list[tuple[str, int]]) -> Group:
    frozen = units[solution.frozen[units]]
    produced = {(producers[i].key, producers[i].dim) for i in indices}
    reasons = tuple(dict.fromkeys(solution.reasons[r] for r in frozen.tolist() if r in solution.reasons))
    first = producers[indices[0]].key
    return Group(
        name=first.rsplit(".", 1)[0] if "." in first else first,
        units=tuple(units.tolist()),
        frozen_units=tuple(frozen.tolist()),
        members=tuple(Member(k, d, (k, d) in produced) for k, d in members),
        reasons=reasons,
        exact=not bool(solution.approximate[units].any()),
    )


def _members(params: Mapping[str, TensorIds], solution: Solution,
             units: list[torch.Tensor]) -> list[list[tuple[str, int]]]:
    """For each group, the parameter dims holding any of its units (one pass over all parameters)."""
    group_of = torch.full((solution.root.numel(),), -1, dtype=torch.long)
    for g, u in enumerate(units):
        group_of[u] = g
    out: list[list[tuple[str, int]]] = [[] for _ in units]
    for key, dims in params.items():
        for dim, ids in enumerate(dims):
            for g in group_of[solution.root[ids]].unique().tolist():
                if g >= 0:
                    out[g].append((key, dim))
    return out


def _find(parent: list[int], i: int) -> int:
    while parent[i] != i:
        parent[i] = parent[parent[i]]
        i = parent[i]
    return i


def _union(parent: list[int], a: int, b: int) -> None:
    ra, rb = _find(parent, a), _find(parent, b)
    if ra != rb:
        parent[max(ra, rb)] = min(ra, rb)
