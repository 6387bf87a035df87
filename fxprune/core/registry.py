"""The rule table's records: an op family is its spellings and what each stage does with them.

An :class:`OpFamily` is one value per family, registered once, in the spirit of JAX's ``dce_rules``
(primitive -> rule) and tinygrad's ``PatternMatcher`` (a list of (pattern, function) pairs). Its
:class:`OpRule` lines each say, for a set of **spellings** — module classes (``nn.Conv2d``), functions
(``F.conv2d``, ``operator.add``), tensor method names (``"view"``), ATen overload packets
(``torch.ops.aten.conv2d``) —

- ``analyze``: ``(OpCall) -> channel map``, the analysis rule (raise ``Unsupported`` to freeze);
- ``rewrite``: ``(RewriteCall) -> None``, which fixes the literal sizes a node of that spelling carries
  after pruning (view sizes, split sizes, ``groups``), or ``None``, *said explicitly*: its arguments
  hold no size that pruning changes;
- ``resize``: ``(old module, new module, RewriteCall) -> None``, which fixes a pruned module's size
  attributes (``out_channels``...). ``None`` on a module class: its base class's resize applies (a QAT
  ``Conv2d`` resizes as ``nn.Conv2d``).

A spelling belongs to one family: registering it twice raises :class:`~fxprune.errors.RuleTableError`
at import, and so does rewriting a node whose sizes changed when no family owns it.

A leaf module (it imports only :mod:`fxprune.errors`): analysis looks rules up here, and the families
in ``fxprune.core.rules`` (which ``fxprune`` imports) register here, so neither imports the other.

Example — a family in its own file under ``fxprune/rules/`` (imported by ``fxprune.core.rules``)::

    from registry import OpFamily, OpRule, register

    def softsign_like(op):
        # f(x) -> f(x): channels pass through
        return op.ids(op.arg(0, "input"))

    FAMILY = register(OpFamily("softsign-like", (
        OpRule((nn.Softsign, F.softsign, "softsign"), softsign_like, rewrite=None),
    )))
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.fx as fx

from fxprune.errors import RuleTableError

Analyze = Callable[[Any], Any]
"""``(OpCall) -> channel map`` (``fxprune.core.opcall.OpCall``)."""
Rewrite = Callable[[Any], None]
"""``(RewriteCall) -> None``: edits the new node's literal sizes (``fxprune.core.rewrite.RewriteCall``)."""
Resize = Callable[[torch.nn.Module, torch.nn.Module, Any], None]
"""``(old module, new module, RewriteCall) -> None``: fixes the new module's size attributes."""


@dataclass(frozen=True)
class OpRule:
    """One line of a family: spellings and the three functions that handle them."""

    spellings: tuple[Any, ...]
    """Module classes, functions, method names, ATen overload packets (may be empty: an optional
    dependency that is not installed)."""
    analyze: Analyze
    """The analysis rule."""
    rewrite: Optional[Rewrite]
    """The literal-size rewrite; ``None`` when the calls carry no literal size (required: say it)."""
    resize: Optional[Resize] = None
    """The module resize (module spellings only); ``None`` inherits the base class's."""

    def __post_init__(self) -> None:  # one object under two names (F.relu_ is torch.relu_) counts once
        object.__setattr__(self, "spellings", tuple(dict.fromkeys(self.spellings)))


@dataclass(frozen=True)
class OpFamily:
    """An op family: a name and its rules, registered once with :func:`register`."""

    name: str
    rules: tuple[OpRule, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "rules", tuple(self.rules))


FAMILIES: dict[str, OpFamily] = {}
"""Every registered family by name, in registration order."""
_OWNER: dict[Any, OpRule] = {}
_FAMILY_OF: dict[Any, str] = {}


def register(family: OpFamily) -> OpFamily:
    """Add a family to the table; a name or spelling already taken raises and adds nothing."""
    if family.name in FAMILIES:
        raise RuleTableError(f"op family {family.name!r} is registered twice")
    seen: dict[Any, str] = {}
    for line in family.rules:
        for spelling in line.spellings:
            other = _FAMILY_OF.get(spelling) or seen.get(spelling)
            if other is not None:
                raise RuleTableError(f"op family {family.name!r}: {describe_spelling(spelling)} already belongs "
                                     f"to op family {other!r}")
            seen[spelling] = family.name
    FAMILIES[family.name] = family
    for line in family.rules:
        for spelling in line.spellings:
            _OWNER[spelling] = line
            _FAMILY_OF[spelling] = family.name
    return family


_LATE: list[Callable[[], None]] = []


def register_late(hook: Callable[[], None]) -> Callable[[], None]:
    """Run ``hook`` before every lookup: it registers spellings that exist only once an optional package
    is imported (torchao's observer classes, transformers' ``grouped_mm_fallback`` op); it must be cheap
    (a ``sys.modules`` check) and register nothing twice."""
    _LATE.append(hook)
    return hook


def run_late_hooks() -> None:
    for hook in _LATE:
        hook()


_AFTER_RULE: list[Callable[[Any, Analyze], None]] = []


def register_after_rule(check: Callable[[Any, Analyze], None]) -> Callable[[Any, Analyze], None]:
    """Run ``check(op, analyze)`` after every rule that returned (not after one that raised
    ``Unsupported``): a fact that spans families, such as sizes read from a tensor's shape, written once
    in the family it belongs to instead of in the walk."""
    _AFTER_RULE.append(check)
    return check


def run_after_rule(op: Any, analyze: Analyze) -> None:
    for check in _AFTER_RULE:
        check(op, analyze)


def owner(spelling: Any) -> Optional[OpRule]:
    """The rule registered for exactly this spelling (no base-class search)."""
    return _OWNER.get(spelling)


def family_of(spelling: Any) -> Optional[str]:
    """The name of the family that owns exactly this spelling."""
    return _FAMILY_OF.get(spelling)


def describe_spelling(spelling: Any) -> str:
    if isinstance(spelling, str):
        return f"method .{spelling}()"
    if isinstance(spelling, type):
        return f"module {spelling.__module__}.{spelling.__qualname__}"
    return str(spelling) if isinstance(spelling, torch._ops.OpOverloadPacket) else \
        getattr(spelling, "__qualname__", None) or str(spelling)


# --- lookup ---------------------------------------------------------------------------------------
def spelling_of(node: fx.Node, module: Optional[torch.nn.Module]) -> list[Any]:
    """Candidate keys of a node, most specific first (a module's classes along its MRO)."""
    if node.op == "call_module":
        return [cls for cls in type(module).__mro__ if cls not in (torch.nn.Module, object)]
    if node.op == "call_method":
        return [str(node.target)]
    target = node.target
    keys = [target]
    if isinstance(target, torch._ops.OpOverload):
        keys.append(target.overloadpacket)
    return keys


def lookup_rule(node: fx.Node, module: Optional[torch.nn.Module]) -> Optional[OpRule]:
    """The rule of the first of the node's spellings that has one (None: no family owns it)."""
    run_late_hooks()
    for key in spelling_of(node, module):
        try:
            found = _OWNER.get(key)
        except TypeError:  # unhashable target
            return None
        if found is not None:
            return found
    return None


def lookup_analyze(node: fx.Node, module: Optional[torch.nn.Module]) -> Optional[Analyze]:
    """The analysis rule of a node (None: no family owns it, the node freezes its channels)."""
    found = lookup_rule(node, module)
    return None if found is None else found.analyze


def lookup_rewrite(node: fx.Node, module: Optional[torch.nn.Module]) -> Optional[Rewrite]:
    """The rewrite of the node's rule; raises :class:`RuleTableError` when no family owns the node."""
    for key in spelling_of(node, module):
        found = _OWNER.get(key)
        if found is not None and (found.rewrite is not None or not isinstance(key, type)):
            return found.rewrite
    if lookup_rule(node, module) is None:
        raise RuleTableError(f"node {node.name!r} ({node.op} {node.target}) changed size but no op family "
                             f"owns it, so nothing can fix its literal sizes")
    return None


def lookup_resize(module: torch.nn.Module) -> Optional[Resize]:
    """The resize of the first class along the module's MRO whose rule has one."""
    for cls in type(module).__mro__:
        found = _OWNER.get(cls)
        if found is not None and found.resize is not None:
            return found.resize
    return None
