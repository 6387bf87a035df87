"""The options that shape a plan, declared once: every entry point derives from :class:`PruneOptions`.

Each field carries its type, default, choices or range check, and help text (in ``metadata``, so the
command line can read them). From this one declaration come:

- the keywords of :func:`fxprune.prune` and :func:`fxprune.hf.prune` (``**options``, or ``options=``
  a ``PruneOptions``), checked by :meth:`PruneOptions.build`;
- the options of the ``prune-channels`` and ``mask-channels`` passes (their fields are these fields; the
  whole-structure fields are ``drop-blocks``' ``criterion`` and ``repair``, ``drop-experts``' ``criterion``);
- the ``fxprune prune`` flags (``--round-to`` for ``round_to``...: :func:`fxprune.cli.option_flags`);
- the ``options`` object of a plan's JSON (:meth:`to_dict` / :meth:`from_dict`, which checks every
  field's type and refuses unknown ones: nothing is coerced or executed).

Validation lives here, in ``__post_init__``: a ``PruneOptions`` that exists is a valid one. The criterion's
name is checked against the criteria table when it is looked up (:mod:`fxprune.data.criteria`, a layer
above this leaf); the names of the closed tables (block criteria, expert criteria, budgets) are declared
here and the tables that implement them are keyed by these names (checked where each table is built).

Some options only one route honours (``route`` in a field's metadata: whole layers, whole experts and a
parameter budget are :mod:`fxprune.hf`'s): :func:`check_route` refuses them, by name, everywhere else.

>>> options = PruneOptions(sparsity={"layer*": 0.3}, capture="export")
>>> options.sparsity["layer*"], options.split_axis
(0.3, 'largest')
>>> PruneOptions.from_dict(options.to_dict()) == options
True
>>> PruneOptions.build(round_to=8).round_to
8

A leaf module: it imports only :mod:`fxprune.errors`.
"""
from __future__ import annotations

import dataclasses
import math
from collections import abc
import typing
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Mapping, Optional, Union

from .errors import InvalidOptionError

DEFAULT_CRITERION = "group_magnitude"
"""The criterion every entry point uses by default (see :mod:`fxprune.data.criteria`)."""
CAPTURES = ("fx", "export")
SPLIT_AXES = ("largest", "outer")
REDUCTIONS = ("mean", "sum", "max")
NORMALIZATIONS = ("none", "mean", "max", "standardize", "lamp")
"""How ``global_ranking`` makes groups' scores comparable (see :func:`fxprune.core.select.normalize_scores`)."""
BLOCK_CRITERIA = ("block-influence", "angular", "sleb", "iterative-influence")
"""How whole residual blocks (an LLM's layers) are scored (:mod:`fxprune.data.block_criteria`)."""
BLOCK_REPAIRS = ("run", "sequential", "sequential-all")
"""Which linears the depth repair refits (:data:`fxprune.data.block_criteria.REPAIR_WALKS`); ``True`` is
``sequential-all`` (:data:`fxprune.data.block_criteria.DEFAULT_WALK`)."""
EXPERT_CRITERIA = ("reap", "frequency", "weight-norm", "random")
"""How whole MoE experts are scored (:mod:`fxprune.hf.experts`, :mod:`fxprune.data.expert_criteria`)."""
BUDGETS = ("params", "active_params", "macs")
"""What ``target`` can budget (:mod:`fxprune.hf.budget`): the parameters, the parameters one token uses (MoE),
the multiply-accumulates at the example inputs' shape."""
HF_ROUTE = "fxprune.hf.prune"
"""The route that removes whole layers and experts and meets a budget (see :func:`check_route`)."""

Sparsity = Union[float, Mapping[str, float]]


def _sparsity_ok(value: Any) -> Optional[str]:
    values = value.items() if isinstance(value, Mapping) else [("sparsity", value)]
    for name, ratio in values:
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or math.isnan(ratio) \
                or not 0 <= ratio < 1:
            return f"sparsity for {name!r} must be a float in [0, 1), got {ratio!r}"
    return None


def _positive(value: int) -> Optional[str]:
    return None if value >= 1 else "must be a positive int"


def _fraction(value: float) -> Optional[str]:
    return None if 0 <= value <= 1 else "must be a float in [0, 1]"


def _target_ok(value: Any) -> Optional[str]:
    if value is None:
        return None
    if len(value) != 1:
        return f"target is one budget, e.g. {{'params': 0.8}}, got {dict(value)!r}"
    (key, fraction), = value.items()
    if key not in BUDGETS:
        return f"target {key!r} is not supported; budgets: {BUDGETS}"
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or math.isnan(fraction) \
            or not 0 < fraction < 1:
        return f"target {key!r} must be a fraction in (0, 1) of the model's {key} kept, got {fraction!r}"
    return None


def option(default: Any, help: str, *, choices: tuple = (), check: Optional[Callable[[Any], Optional[str]]] = None,
           metavar: Optional[str] = None, internal: bool = False, route: Optional[str] = None) -> Any:
    """A field of :class:`PruneOptions`: its default, help text and constraints, in one place.

    ``check(value)`` returns None or what is wrong; ``internal`` fields are set by an adapter, never by a
    user (no keyword, no flag); ``route``: the only entry point that honours the field (every other one
    refuses it, :func:`check_route`; no pass but its own declares it)."""
    metadata = {"help": help, "choices": choices, "check": check, "metavar": metavar, "internal": internal,
                "route": route}
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class PruneOptions:
    """Every choice that shapes a plan (see the module docstring for who reads it)."""

    sparsity: Sparsity = option(0.5, "fraction of each group's units to drop, in [0, 1), or {module "
                                     "pattern: ratio}", check=_sparsity_ok, metavar="F")
    criterion: str = option(DEFAULT_CRITERION, "importance criterion (a callable is recorded by its "
                                               "__name__)")
    capture: str = option("fx", "graph level: fx (symbolic_trace) or export (torch.export, ATen)",
                          choices=CAPTURES)
    reduce: str = option("mean", "how a unit's scores over several members combine", choices=REDUCTIONS)
    global_ranking: bool = option(False, "rank the units of all groups together (scores normalised per "
                                         "group) instead of per group")
    round_to: int = option(1, "kept channel counts are a multiple of N (a unit of several channels, a "
                              "head, counts as that many)", check=_positive, metavar="N")
    min_keep: int = option(1, "no group keeps fewer units than N", check=_positive, metavar="N")
    ignore: tuple[str, ...] = option((), "fnmatch patterns of modules whose groups are kept whole",
                                     metavar="PATTERN")
    normalize: str = option("mean", "how global_ranking compares groups (standardize: FLAP's adaptive "
                                    "ratios)", choices=NORMALIZATIONS)
    min_keep_ratio: float = option(0.0, "every group keeps at least this fraction of its units",
                                   check=_fraction, metavar="F")
    prune_outputs: bool = option(False, "also prune channels that reach a graph output (changes its shape)")
    split_axis: str = option("largest", "which axis carries the channels where a view splits a channel dim",
                             choices=SPLIT_AXES)
    code_sizes: Optional[bool] = option(None, "set by fxprune.module: a width the user's forward reads from one "
                                              "tensor's shape and gives another's view keeps the two equal",
                                        internal=True)
    propagate_bias: bool = option(False, "fold each dropped channel's constant part (its bias through "
                                         "norms and activations) into the consumers' biases")
    seed: int = option(0, "seed of the random criterion (and of the CLI's random weights and inputs)")
    block_criterion: str = option("block-influence", "how the layers a sparsity on the layer count "
                                                     "(num_hidden_layers) removes are chosen, on calibration data",
                                  choices=BLOCK_CRITERIA, route=HF_ROUTE)
    block_repair: Union[bool, str] = option(False, "repair the removed layers by least squares on the calibration "
                                                   "data: run (the linear before each removed run), "
                                                   "sequential (every kept layer's MLP output from there on, "
                                                   "toward the original's stream) or sequential-all (True: "
                                                   "its attention output too)", choices=(False, True) + BLOCK_REPAIRS,
                                            metavar="WALK", route=HF_ROUTE)
    expert_criterion: str = option("reap", "how the experts a sparsity on the expert count (num_experts, "
                                           "num_local_experts) removes are chosen", choices=EXPERT_CRITERIA,
                                   route=HF_ROUTE)
    target: Optional[Mapping[str, float]] = option(None, "one budget instead of ratios, {KIND: F} with KIND params, "
                                                         "active_params (MoE: the parameters a token uses) or macs "
                                                         "(at the example inputs' shape): the mix of layers, experts "
                                                         "(MoE, params) and MLP width removed is chosen to keep F of "
                                                         "it, by the loss of each mix on held-out calibration "
                                                         "sequences", check=_target_ok, metavar="KIND=F",
                                                   route=HF_ROUTE)
    hf: Optional[Mapping[str, Any]] = option(None, "set by fxprune.hf: hf_compatible, layer_indices and "
                                                   "the constraint that shaped each group", internal=True)

    def __post_init__(self) -> None:
        if isinstance(self.sparsity, Mapping):
            object.__setattr__(self, "sparsity", MappingProxyType(dict(self.sparsity)))
        if isinstance(self.ignore, list):
            object.__setattr__(self, "ignore", tuple(self.ignore))
        for name in ("hf", "target"):
            if isinstance(getattr(self, name), Mapping):
                object.__setattr__(self, name, MappingProxyType(dict(getattr(self, name))))
        for f in dataclasses.fields(self):
            _check(f, getattr(self, f.name))

    # copy and deepcopy keep the value (a read-only mapping cannot be pickled, and needs no copy)
    def __copy__(self) -> "PruneOptions":
        return self

    def __deepcopy__(self, memo: dict) -> "PruneOptions":
        return self

    @classmethod
    def build(cls, base: Optional["PruneOptions"] = None, **given: Any) -> "PruneOptions":
        """``base`` (default: all defaults) with the ``given`` fields that are not None; an unknown or
        internal name is an ``InvalidOptionError`` listing the known ones.

        >>> PruneOptions.build(PruneOptions(seed=3), round_to=8, sparsity=None).seed
        3
        """
        if base is not None and not isinstance(base, PruneOptions):
            raise InvalidOptionError(f"options= takes a fxprune.PruneOptions, got {type(base).__name__}")
        known = set(public_fields())
        unknown = sorted(set(given) - known)
        if unknown:
            raise InvalidOptionError(f"unknown option {unknown[0]!r}; the options are {sorted(known)}")
        changes = {k: v for k, v in given.items() if v is not None}
        return dataclasses.replace(base or cls(), **changes)

    def replace(self, **changes: Any) -> "PruneOptions":
        """A copy with ``changes`` (the value itself never changes)."""
        return dataclasses.replace(self, **changes)

    def changed(self) -> dict[str, Any]:
        """The public fields that differ from their defaults."""
        return {name: getattr(self, name) for name, f in public_fields().items()
                if getattr(self, name) != f.default}

    def to_dict(self) -> dict[str, Any]:
        """The JSON object a plan stores (fields left at ``None`` omitted)."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)
                if getattr(self, f.name) is not None}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "PruneOptions":
        """Options from a plan's JSON object; an unknown field or a value of the wrong type raises
        ``InvalidOptionError`` naming it (nothing is coerced or executed)."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - fields)
        if unknown:
            raise InvalidOptionError(f"unknown plan option {unknown[0]!r}; known: {sorted(fields)}")
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        for name, value in values.items():
            if not _has_type(value, _hint(name)):
                raise InvalidOptionError(f"plan option {name!r} has the wrong type: {type(value).__name__} "
                                         f"{str(value)[:60]!r}")
        return cls(**values)


def same_as(name: str) -> Any:
    """A dataclass field (a pass's option under its own name) with the default, help and checks of
    ``PruneOptions.<name>``: ``criterion: str = same_as("block_criterion")`` in ``drop-blocks``."""
    f = public_fields()[name]
    return field(default=f.default, metadata=f.metadata)


def keyed_by(names: tuple[str, ...], table: dict[str, Any], what: str) -> dict[str, Any]:
    """``table``, a records table implementing the choices of an option (``names``, declared here),
    checked to hold exactly those names in that order: the table and the option cannot drift apart."""
    if tuple(table) != tuple(names):
        raise TypeError(f"the {what} table holds {tuple(table)}, the option declares {tuple(names)}")
    return table


def public_fields() -> dict[str, dataclasses.Field]:
    """The fields a user sets (every one but the adapters' records), by name, in declaration order."""
    return {f.name: f for f in dataclasses.fields(PruneOptions) if not f.metadata["internal"]}


def route_fields(route: str = HF_ROUTE) -> tuple[str, ...]:
    """The fields only ``route`` honours (:data:`HF_ROUTE`: whole layers, whole experts, the budget)."""
    return tuple(name for name, f in public_fields().items() if f.metadata["route"] == route)


def check_route(options: PruneOptions, route: str, instead: Mapping[str, str] = MappingProxyType({})) -> None:
    """Refuse, by name, an option set to other than its default that ``route`` cannot honour (it
    belongs to another route): never ignored. ``instead``: per option, what to use on this route.

    >>> check_route(PruneOptions(block_repair=True), "fxprune.prune")
    Traceback (most recent call last):
    ...
    fxprune.errors.InvalidOptionError: fxprune.prune cannot honour block_repair=True: only fxprune.hf.prune does
    """
    for name, f in public_fields().items():
        owner, value = f.metadata["route"], getattr(options, name)
        if owner is not None and owner != route and value != f.default:
            shown = _plain(value) if isinstance(value, Mapping) else value
            raise InvalidOptionError(f"{route} cannot honour {name}={shown!r}: only {owner} does"
                                     + (f"; {instead[name]}" if name in instead else ""))


# --- checking a field ---------------------------------------------------------------------------------
_HINTS: dict[str, Any] = {}


def _hint(name: str) -> Any:
    if not _HINTS:
        _HINTS.update(typing.get_type_hints(PruneOptions))
    return _HINTS[name]


def _check(f: dataclasses.Field, value: Any) -> None:
    if not _has_type(value, _hint(f.name)):
        raise InvalidOptionError(f"{f.name} must be {_type_name(_hint(f.name))}, got {type(value).__name__} "
                                 f"{str(value)[:60]!r}")
    choices, check = f.metadata["choices"], f.metadata["check"]
    if choices and value not in choices:
        raise InvalidOptionError(f"{f.name} must be one of {choices}, got {value!r}")
    problem = check(value) if check is not None else None
    if problem:
        raise InvalidOptionError(problem if problem.startswith(f.name) else f"{f.name} {problem}, got {value!r}")


def _has_type(value: Any, hint: Any) -> bool:
    """JSON-strict: a bool is not an int, an int is a float, a tuple holds what it says."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin is Union:
        return any(_has_type(value, a) for a in args)
    if hint is type(None):
        return value is None
    if origin is tuple:
        return isinstance(value, tuple) and all(_has_type(v, args[0]) for v in value)
    if origin in (abc.Mapping, dict):
        return isinstance(value, Mapping) and all(isinstance(k, str) and (not args or _has_type(v, args[1]))
                                                  for k, v in value.items())
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


_TYPE_NAMES = {float: "a float", int: "an int", bool: "True or False", str: "a string"}


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) is tuple:
        return "a tuple of strings"
    if typing.get_origin(hint) is Union:
        return " or ".join(_type_name(a) for a in typing.get_args(hint) if a is not type(None))
    if typing.get_origin(hint) is abc.Mapping:
        return "a mapping of names to " + _type_name(typing.get_args(hint)[1]).replace("a ", "", 1) + "s"
    return _TYPE_NAMES.get(hint, str(hint))


def _plain(value: Any) -> Any:
    """JSON data: read-only mappings as dicts, tuples as lists."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
