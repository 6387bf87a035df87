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
from dataclasses import dataclass, field
from typing import Any, Mapping

from .errors import UnsafeFileError

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
    options: Mapping[str, Any] = field(default_factory=dict)
    """The options that produced the plan (informative)."""

    def to_json(self, indent: int | None = 1) -> str:
        data = {
            "format": FORMAT,
            "kept_indices": {k: {str(d): list(v) for d, v in dims.items()}
                             for k, dims in sorted(self.kept_indices.items())},
            "shapes": {k: list(v) for k, v in sorted(self.shapes.items())},
            "groups": [g.__dict__ | {"reasons": list(g.reasons)} for g in self.groups],
            "options": dict(self.options),
        }
        return json.dumps(data, indent=indent, sort_keys=False)

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        """Parse a plan; anything but the plan's own JSON schema is refused."""
        try:
            data = json.loads(text)
        except (TypeError, ValueError) as exc:
            raise UnsafeFileError(f"not a JSON plan: {exc}") from exc
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise UnsafeFileError(f"not an fxprune plan (expected format {FORMAT!r})")
        try:
            kept = {str(k): {int(d): tuple(int(i) for i in v) for d, v in dims.items()}
                    for k, dims in data["kept_indices"].items()}
            shapes = {str(k): tuple(int(s) for s in v) for k, v in data["shapes"].items()}
            groups = tuple(GroupSummary(str(g["name"]), int(g["size"]), int(g["kept"]), bool(g["exact"]),
                                        int(g.get("frozen", 0)), tuple(str(r) for r in g.get("reasons", ())))
                           for g in data.get("groups", ()))
            options = {str(k): v for k, v in dict(data.get("options", {})).items()
                       if isinstance(v, (str, int, float, bool, type(None), list, dict))}
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise UnsafeFileError(f"malformed fxprune plan: {type(exc).__name__}: {exc}") from exc
        return cls(kept, shapes, groups, options)

    def __str__(self) -> str:
        lines = [f"Plan: {len(self.kept_indices)} tensors shrink"]
        for g in self.groups:
            note = "" if g.exact else " (approximate)"
            frozen = f", {g.frozen} frozen" if g.frozen else ""
            lines.append(f"  {g.name}: {g.size} -> {g.kept}{frozen}{note}")
        return "\n".join(lines)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Plan):
            return NotImplemented
        return (_norm(self.kept_indices) == _norm(other.kept_indices) and dict(self.shapes) == dict(other.shapes)
                and self.groups == other.groups and dict(self.options) == dict(other.options))

    __hash__ = None  # type: ignore[assignment]


def _norm(kept: Mapping) -> dict:
    return {k: {int(d): tuple(v) for d, v in dims.items()} for k, dims in kept.items()}
