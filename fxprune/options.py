"""The options that shape a plan, as one frozen value: what :func:`fxprune.prune`, the pruning passes,
the CLI and a saved plan share.

:func:`fxprune.prune` builds one from its keyword arguments, checks it, and stores it in the plan
(``result.plan.options``); ``apply_plan``, ``mask-channels`` and the recovery passes read it back as
attributes, never by string. In a plan's JSON it is a plain object of these fields; loading checks each
field's type and refuses unknown ones.

>>> options = PruneOptions(sparsity={"layer*": 0.3}, capture="export")
>>> options.sparsity["layer*"], options.split_axis
(0.3, 'largest')
>>> PruneOptions.from_dict(options.to_dict()) == options
True

A leaf module: it imports only :mod:`fxprune.errors`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Mapping, Optional, Union

from fxprune.errors import InvalidOptionError

DEFAULT_CRITERION = "group_magnitude"
"""The criterion every entry point uses by default (see :mod:`fxprune.data.criteria`)."""
CAPTURES = ("fx", "export")
SPLIT_AXES = ("largest", "outer")


@dataclass(frozen=True)
class PruneOptions:
    """Every choice that shapes a plan. See :func:`fxprune.prune` for what each one does."""

    sparsity: Union[float, Mapping[str, float]] = 0.5
    """Fraction of each group's units to drop, or ``{module pattern: ratio}`` (a read-only mapping)."""
    criterion: str = DEFAULT_CRITERION
    """The criterion's name (a callable criterion is recorded by its ``__name__``)."""
    capture: str = "fx"
    reduce: str = "mean"
    global_ranking: bool = False
    round_to: int = 1
    min_keep: int = 1
    ignore: tuple[str, ...] = ()
    normalize: str = "mean"
    min_keep_ratio: float = 0.0
    prune_outputs: bool = False
    split_axis: str = "largest"
    propagate_bias: bool = False
    seed: int = 0
    hf: Optional[Mapping[str, Any]] = None
    """Set by :mod:`fxprune.hf`: ``hf_compatible``, ``layer_indices`` and the constraint that shaped
    each group (``constraints``: {group name: why})."""

    def __post_init__(self) -> None:
        if isinstance(self.sparsity, Mapping):
            object.__setattr__(self, "sparsity", MappingProxyType(dict(self.sparsity)))
        object.__setattr__(self, "ignore", tuple(self.ignore))
        if self.hf is not None:
            object.__setattr__(self, "hf", MappingProxyType(dict(self.hf)))
        if self.capture not in CAPTURES:
            raise InvalidOptionError(f"capture must be one of {CAPTURES}, got {self.capture!r}")
        if self.split_axis not in SPLIT_AXES:
            raise InvalidOptionError(f"split_axis must be one of {SPLIT_AXES}, got {self.split_axis!r}")

    def replace(self, **changes: Any) -> "PruneOptions":
        """A copy with ``changes`` (the value itself never changes)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object a plan stores (fields left at ``None`` omitted)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            out[f.name] = _plain(value)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "PruneOptions":
        """Options from a plan's JSON object; an unknown field or a value of the wrong type raises
        ``InvalidOptionError`` naming it (nothing is coerced or executed)."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise InvalidOptionError(f"unknown plan option {unknown[0]!r}; known: {sorted(fields)}")
        for name, value in data.items():
            _check_type(name, value)
        return cls(**{k: tuple(v) if k == "ignore" else v for k, v in data.items()})


_TYPES: dict[str, tuple[type, ...]] = {
    "sparsity": (int, float, dict), "criterion": (str,), "capture": (str,), "reduce": (str,),
    "global_ranking": (bool,), "round_to": (int,), "min_keep": (int,), "ignore": (list, tuple),
    "normalize": (str,), "min_keep_ratio": (int, float), "prune_outputs": (bool,), "split_axis": (str,),
    "propagate_bias": (bool,), "seed": (int,), "hf": (dict,),
}


def _check_type(name: str, value: Any) -> None:
    types = _TYPES[name]
    wrong = not isinstance(value, types) or (isinstance(value, bool) and bool not in types)
    if name == "ignore" and not wrong:
        wrong = not all(isinstance(v, str) for v in value)
    if name == "sparsity" and isinstance(value, dict) and not wrong:
        wrong = not all(isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool)
                        for k, v in value.items())
    if wrong:
        raise InvalidOptionError(f"plan option {name!r} has the wrong type: {type(value).__name__} "
                                 f"{str(value)[:60]!r}")


def _plain(value: Any) -> Any:
    """JSON data: read-only mappings as dicts, tuples as lists."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
