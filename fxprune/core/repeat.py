"""Repeated blocks analysed once: the analysis of a model with ``n`` identical numbered blocks
(an LLM's decoder layers ``model.layers.0 ... model.layers.{n-1}``) from the analysis of the same
model built with three of them.

>>> proxy = match(gm_with_3_layers, "export")                         # doctest: +SKIP
>>> full = repeat_blocks(proxy, "model.layers.", 32)                  # doctest: +SKIP
>>> len(full.groups)                                                  # doctest: +SKIP
66

Block 0 touches what comes before the blocks, block 2 what comes after; block 1 touches only its
neighbours, so it stands for blocks ``1 .. n-2``. Its *local* channel ids (ids no node outside block
1 holds) are copied, one fresh range per copy; ids it shares with the rest (the residual stream) are
shared by the copies too, which is what the full graph's unifications amount to. Block 2 becomes block
``n-1`` by renaming. The result has the full model's parameters, classes and groups (same names, same
order), so scoring, selection and plans are those of the full analysis, at the cost of three blocks.

What it does not carry: the copies' activations (``env`` stays the proxy's, its copies' id arrays are
kept for selection's segments), so it serves the weight criteria, selection and plans, not rewriting a
graph or calibration. A class rooted inside block 1 that reaches outside it cannot be copied and
raises ``UnsupportedModelError``: the caller analyses the full model instead.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.fx as fx

from fxprune.core.analysis import Analysis
from fxprune.core.channels import Solution
from fxprune.core.graph import iter_arrays, tensor_at
from fxprune.core.groups import build_groups
from fxprune.core.lockstep import Lockstep, remap
from fxprune.errors import UnsupportedModelError

#: The blocks of the proxy: first, the one copied, last.
PROXY_BLOCKS = 3


def block_of(name: str, prefix: str) -> Optional[int]:
    """The block index of a parameter or module path, or None outside the blocks.

    >>> block_of("model.layers.12.mlp.up_proj.weight", "model.layers."), block_of("lm_head", "model.layers.")
    (12, None)
    """
    if not name.startswith(prefix):
        return None
    match = re.match(r"\d+(?=\.|$)", name[len(prefix):])
    return int(match.group()) if match else None


def renamed(name: str, prefix: str, block: int) -> str:
    """``name`` moved to block ``block`` (``model.layers.1.x`` -> ``model.layers.7.x``)."""
    rest = re.sub(r"^\d+", "", name[len(prefix):])
    return f"{prefix}{block}{rest}"


@dataclass(frozen=True)
class Repeated(Analysis):
    """An analysis expanded from a three-block proxy (see the module docstring)."""

    prefix: str = ""
    blocks: int = 0
    copied_arrays: tuple = ()
    """The id arrays of block 1's activations, remapped for each copy (selection's segments)."""

    def proxy_key(self, key: str) -> str:
        """The proxy's name of a full model's tensor (block ``7`` -> block 1, block ``n-1`` -> block 2)."""
        block = block_of(key, self.prefix)
        if block is None or block < PROXY_BLOCKS - 1:
            return key
        return renamed(key, self.prefix, PROXY_BLOCKS - 1 if block == self.blocks - 1 else 1)

    def tensor(self, key: str) -> torch.Tensor:
        return tensor_at(self.gm, self.proxy_key(key))

    def id_arrays(self) -> list[torch.Tensor]:
        return super().id_arrays() + list(self.copied_arrays)


def repeat_blocks(proxy: Analysis, prefix: str, blocks: int) -> Analysis:
    """The analysis of the model with ``blocks`` blocks named ``{prefix}{i}``, from ``proxy``'s three."""
    if blocks <= PROXY_BLOCKS:
        raise UnsupportedModelError(f"repeat_blocks expands {PROXY_BLOCKS} blocks to more, got {blocks}")
    local = _local_ids(proxy, prefix)
    _check_closed(proxy.solution, local, prefix)
    maps = [_copy_map(proxy.solution.root.numel(), local, c) for c in range(blocks - PROXY_BLOCKS)]
    solution = _solution(proxy.solution, local, maps)
    params = _expand(proxy.params.items(), prefix, blocks, maps, lambda ids, m: tuple(_remap(i, m) for i in ids))
    producers = [dataclasses.replace(p, key=k)
                 for k, p in _expand(((p.key, p) for p in proxy.producers), prefix, blocks, maps, lambda p, m: p)]
    locksteps = _locksteps(proxy.locksteps, local, maps, prefix)
    groups = build_groups(dict(params), producers, solution, ties=[lock.units for lock in locksteps])
    arrays = [a for a in _node_arrays(proxy) if bool(local[a[a >= 0]].any())]
    copied = tuple(_remap(a, m) for m in maps for a in arrays)
    fields = {f.name: getattr(proxy, f.name) for f in dataclasses.fields(Analysis)}
    fields.update(params=dict(params), solution=solution, producers=tuple(producers), groups=groups,
                  locksteps=locksteps)
    return Repeated(**fields, prefix=prefix, blocks=blocks, copied_arrays=copied)


def _locksteps(locks: tuple[Lockstep, ...], local: torch.Tensor, maps: list[torch.Tensor],
               prefix: str) -> tuple[Lockstep, ...]:
    """The proxy's locksteps, with one copy per copied block of those inside block 1."""
    copies = []
    for lock in locks:
        inside = local[torch.tensor(lock.units, dtype=torch.long)]
        if bool(inside.any()) and not bool(inside.all()):
            raise UnsupportedModelError(f"{prefix}1 is not a repeatable block: a chunk at {lock.where[0]} keeps "
                                        f"its channels equal to channels outside it; analyse the full model")
        if bool(inside.all()):
            copies += [remap(lock, m) for m in maps]
    return locks + tuple(copies)


# --- which ids belong to block 1 alone ------------------------------------------------------------
def _node_block(node: fx.Node, prefix: str) -> Optional[int]:
    if node.op == "get_attr":
        return block_of(str(node.target), prefix)
    stack = list((node.meta.get("nn_module_stack") or {}).values())
    return block_of(str(stack[-1][0]), prefix) if stack else None


def _node_arrays(analysis: Analysis) -> list[torch.Tensor]:
    return [a for node, value in analysis.env.items() for a in iter_arrays(value)
            if node.op != "get_attr"]


def _local_ids(proxy: Analysis, prefix: str) -> torch.Tensor:
    """Bool per id: held by block 1's parameters or activations and by nothing else."""
    size = proxy.solution.root.numel()
    inside, outside = torch.zeros(size, dtype=torch.bool), torch.zeros(size, dtype=torch.bool)
    for key, dims in proxy.params.items():
        target = inside if block_of(key, prefix) == 1 else outside
        for ids in dims:
            if ids is not None:
                target[ids[ids >= 0]] = True
    for node, value in proxy.env.items():
        target = inside if _node_block(node, prefix) == 1 else outside
        for ids in iter_arrays(value):
            target[ids[ids >= 0]] = True
    return inside & ~outside


def _check_closed(solution: Solution, local: torch.Tensor, prefix: str) -> None:
    """A class rooted in block 1 must lie in block 1: its copies are then classes of their own."""
    ids = torch.arange(local.numel())
    leaking = ~local & local[solution.root[ids]]
    if bool(leaking.any()):
        raise UnsupportedModelError(f"{prefix}1 is not a repeatable block: one of its channel classes reaches "
                                    f"outside it (id {int(ids[leaking][0])}); analyse the full model")


def _copy_map(size: int, local: torch.Tensor, copy: int) -> torch.Tensor:
    """id -> id in copy ``copy``: block 1's local ids to a fresh range, the others unchanged."""
    local_ids = local.nonzero().flatten()
    out = torch.arange(size)
    out[local_ids] = size + copy * local_ids.numel() + torch.arange(local_ids.numel())
    return out


def _remap(ids: Optional[torch.Tensor], mapping: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    if ids is None or mapping is None:
        return ids
    return torch.where(ids >= 0, mapping[ids.clamp_min(0)], ids)


def _solution(solution: Solution, local: torch.Tensor, maps: list[torch.Tensor]) -> Solution:
    local_ids = local.nonzero().flatten()
    roots, frozen, approx, reasons = [solution.root], [solution.frozen], [solution.approximate], dict(solution.reasons)
    keys = torch.tensor(list(solution.reasons), dtype=torch.long)
    inside = keys[local[keys]] if keys.numel() else keys  # the frozen roots of block 1: their reasons copy
    whys = [solution.reasons[r] for r in inside.tolist()]
    for mapping in maps:
        roots.append(mapping[solution.root[local_ids]])  # a global root stays; a local one is copied
        frozen.append(solution.frozen[local_ids])
        approx.append(solution.approximate[local_ids])
        reasons.update(zip(mapping[inside].tolist(), whys))
    return Solution(torch.cat(roots), torch.cat(frozen), torch.cat(approx), reasons)


# --- keys in the full model's order ----------------------------------------------------------------
def _expand(items: Any, prefix: str, blocks: int, maps: list[torch.Tensor], copy: Any) -> list[tuple[str, Any]]:
    """(key, value) in the full model's order: block 1's entries, then their copies as blocks
    ``2 .. n-2`` (values through ``copy(value, map)``), then block 2's as block ``n-1``."""
    items = list(items)
    ones = [(k, v) for k, v in items if block_of(k, prefix) == 1]
    copies = [(renamed(k, prefix, c + 2), copy(v, maps[c])) for c in range(len(maps)) for k, v in ones]
    out: list[tuple[str, Any]] = []
    for key, value in items:
        if block_of(key, prefix) == PROXY_BLOCKS - 1:
            out += copies
            copies = []
            key = renamed(key, prefix, blocks - 1)
        out.append((key, value))
    return out + copies
