"""Plan: which indices of which parameters survive — frozen, printable, JSON round-trip.

``kept_indices`` is keyed by the original ``state_dict`` key, so a plan made at the fx level applies at the
export level and to a fresh copy of the model. Plans hold only JSON data: loading one never executes
code or unpickles anything.

>>> plan = result.plan                                     # doctest: +SKIP
>>> Plan.from_json(plan.to_json()) == plan                 # doctest: +SKIP
True
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

from fxprune.errors import InvalidOptionError, UnsafeFileError
from fxprune.options import PruneOptions

FORMAT = "fxprune.plan/1"


@dataclass(frozen=True)
class GroupSummary:
    """One group as the plan reports it."""

    name: str
    size: int
    kept: int
    exact: bool
    frozen: int = 0
    reasons: tuple[str, ...] = ()


@dataclass(frozen=True)
class Plan:
    kept_indices: Mapping[str, Mapping[int, tuple[int, ...]]]
    """{state_dict key: {dim: sorted kept indices}}, only for dims that lose positions."""
    shapes: Mapping[str, tuple[int, ...]]
    """The original shape of every tensor in ``kept_indices`` (checked when the plan is applied)."""
    groups: tuple[GroupSummary, ...] = ()
    options: PruneOptions = field(default_factory=PruneOptions)
    """The options that produced the plan (``apply_plan`` and the passes read capture, split axis,
    output pruning and bias folding from it)."""
    ungrouped: Mapping[str, str] = field(default_factory=dict)
    """Every tensor the graph reads that is in no group, with the reason (``fxprune.core.ungrouped``): no tensor
    is left alone silently."""

    def to_json(self, indent: int | None = 1) -> str:
        data = {
            "format": FORMAT,
            "kept_indices": {k: {str(d): list(v) for d, v in dims.items()}
                             for k, dims in sorted(self.kept_indices.items())},
            "shapes": {k: list(v) for k, v in sorted(self.shapes.items())},
            "groups": [g.__dict__ | {"reasons": list(g.reasons)} for g in self.groups],
            "options": self.options.to_dict(),
            "ungrouped": dict(sorted(self.ungrouped.items())),
        }
        return json.dumps(data, indent=indent, sort_keys=False)

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        """Parse a plan; anything but the plan's own JSON schema is refused.

        Types are checked, never coerced: an index or size must be a JSON integer in ``[0, 2**63)``
        (not ``"1"``, ``1.5``, ``true`` or ``1e999``), a dim a string of digits, a group field of its
        own type. Nesting too deep for the parser is refused like any other malformed text.
        """
        try:
            data = json.loads(text)
        except (TypeError, ValueError, RecursionError) as exc:
            raise UnsafeFileError(f"not a JSON plan: {type(exc).__name__}: {str(exc)[:200]}") from exc
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise UnsafeFileError(f"not an fxprune plan (expected format {FORMAT!r})")
        unknown = sorted(set(data) - _PLAN_KEYS)
        if unknown:
            raise UnsafeFileError(f"malformed fxprune plan: unknown keys {unknown[:3]}")
        try:
            kept = {_key(k): {_dim(d): _ints(v, f"kept_indices[{k!r}][{d!r}]") for d, v in _obj(dims, k).items()}
                    for k, dims in _obj(data["kept_indices"], "kept_indices").items()}
            shapes = {_key(k): _ints(v, f"shapes[{k!r}]") for k, v in _obj(data["shapes"], "shapes").items()}
            groups = tuple(_group(g) for g in _list(data.get("groups", []), "groups"))
            options = PruneOptions.from_dict(_shallow(_obj(data.get("options", {}), "options"), "options"))
            ungrouped = {_key(k): _str(v, f"ungrouped[{k!r}]")
                         for k, v in _obj(data.get("ungrouped", {}), "ungrouped").items()}
        except (KeyError, TypeError, ValueError, InvalidOptionError) as exc:
            raise UnsafeFileError(f"malformed fxprune plan: {type(exc).__name__}: {exc}") from exc
        return cls(kept, shapes, groups, options, ungrouped)

    def __str__(self) -> str:
        lines = [f"Plan: {len(self.kept_indices)} tensors shrink"]
        for g in self.groups:
            note = "" if g.exact else " (approximate)"
            frozen = f", {g.frozen} frozen" if g.frozen else ""
            lines.append(f"  {g.name}: {g.size} -> {g.kept}{frozen}{note}")
        return "\n".join(lines + ungrouped_lines(self.ungrouped))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Plan):
            return NotImplemented
        return (_norm(self.kept_indices) == _norm(other.kept_indices) and dict(self.shapes) == dict(other.shapes)
                and self.groups == other.groups and self.options == other.options
                and dict(self.ungrouped) == dict(other.ungrouped))

    __hash__ = None  # type: ignore[assignment]


def ungrouped_lines(ungrouped: Mapping[str, str], examples: int = 3) -> list[str]:
    """The tensors in no group, one line per reason with a few names (the plan's JSON has them all)."""
    if not ungrouped:
        return []
    by_reason: dict[str, list[str]] = {}
    for name, reason in ungrouped.items():
        by_reason.setdefault(reason, []).append(name)
    lines = [f"{len(ungrouped)} tensors in no group (kept as they are):"]
    for reason, names in sorted(by_reason.items(), key=lambda item: (-len(item[1]), item[0])):
        more = f" and {len(names) - examples} more" if len(names) > examples else ""
        lines.append(f"  {len(names)} x {reason}: {', '.join(names[:examples])}{more}")
    return lines


def _norm(kept: Mapping) -> dict:
    return {k: {int(d): tuple(v) for d, v in dims.items()} for k, dims in kept.items()}


# --- the strict schema of from_json: check types, never coerce them ----------------------------------
_MAX_INT = 2**63
_PLAN_KEYS = {"format", "kept_indices", "shapes", "groups", "options", "ungrouped"}


def _obj(value: Any, where: str) -> dict:
    if not isinstance(value, dict):
        raise TypeError(f"{where!s} must be a JSON object, got {type(value).__name__}")
    return value


def _list(value: Any, where: str) -> list:
    if not isinstance(value, list):
        raise TypeError(f"{where!s} must be a JSON list, got {type(value).__name__}")
    return value


def _key(value: Any) -> str:
    if not isinstance(value, str):  # json object keys are always strings; kept for clarity
        raise TypeError(f"key {value!r} must be a string")
    return value


def _str(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{where} must be a string, got {type(value).__name__}")
    return value


_MAX_DEPTH = 8


def _shallow(value: Any, where: str) -> Any:
    """``value`` if nested at most :data:`_MAX_DEPTH` deep: deeper options (``options.hf``) would overflow
    the stack of every function that walks them (printing, hashing, writing the plan back)."""
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if depth > _MAX_DEPTH:
            raise ValueError(f"{where} is nested more than {_MAX_DEPTH} deep")
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        stack.extend((child, depth + 1) for child in children)
    return value


def _dim(value: str) -> int:
    if not re.fullmatch(r"[0-9]{1,4}", value):  # ASCII only: str.isdigit() accepts "٣" and "³"
        raise ValueError(f"dim {value!r} must be a small non-negative integer written as a string")
    return int(value)


def _int(value: Any, where: str) -> int:
    if type(value) is not int or not 0 <= value < _MAX_INT:
        raise ValueError(f"{where} holds {str(value)[:40]!r} ({type(value).__name__}); expected an integer "
                         f"in [0, 2**63)")
    return value


def _ints(value: Any, where: str) -> tuple[int, ...]:
    return tuple(_int(i, where) for i in _list(value, where))


_GROUP_FIELDS = {"name": str, "size": int, "kept": int, "exact": bool, "frozen": int, "reasons": list}


def _group(g: Any) -> GroupSummary:
    g = _obj(g, "a group")
    unknown = sorted(set(g) - set(_GROUP_FIELDS))
    if unknown:
        raise ValueError(f"group has unknown fields {unknown[:3]}")
    for name, kind in _GROUP_FIELDS.items():
        if name in g and type(g[name]) is not kind:
            raise TypeError(f"group field {name!r} must be {kind.__name__}, got {type(g[name]).__name__}")
    reasons = tuple(g.get("reasons", ()))
    if not all(isinstance(r, str) for r in reasons):
        raise TypeError("group reasons must be strings")
    return GroupSummary(g["name"], _int(g["size"], "group size"), _int(g["kept"], "group kept"), g["exact"],
                        _int(g.get("frozen", 0), "group frozen"), reasons)
