"""The rule table: one module per op family, each rule written once for every spelling.

A spelling is a module class (``nn.Conv2d``), a function (``F.conv2d``, ``torch.cat``), a tensor method
name (``"view"``) or an ATen overload packet (``torch.ops.aten.conv2d``). ``@rule(*spellings)`` registers
an analysis function ``(OpCall) -> channel map`` and ``@rewriter(*spellings)`` the function that fixes a
node's literal sizes after pruning. A node whose spelling has no rule freezes its channels.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.fx as fx

from ..errors import RuleTableError

RULES: dict[Any, Callable] = {}
REWRITERS: dict[Any, Callable] = {}
RESIZERS: dict[type, Callable] = {}


def rule(*spellings: Any) -> Callable:
    """Register an analysis rule for every spelling given."""
    return _register(RULES, spellings)


def rewriter(*spellings: Any) -> Callable:
    """Register the literal-size rewriter of a node kind."""
    return _register(REWRITERS, spellings)


def resizer(*module_types: type) -> Callable:
    """Register the function that fixes a pruned module's size attributes (``out_channels``...)."""
    return _register(RESIZERS, module_types)


def _register(table: dict, keys: tuple) -> Callable:
    def decorate(fn: Callable) -> Callable:
        taken = [key for key in keys if key in table and table[key] is not fn]
        if taken:  # checked before anything is added: a refused registration leaves the table as it was
            raise RuleTableError(f"{fn.__module__}.{fn.__qualname__}: {_spelled(taken[0])} is already handled by "
                                 f"{table[taken[0]].__module__}.{table[taken[0]].__qualname__}")
        for key in keys:
            table[key] = fn
        return fn
    return decorate


def _spelled(key: Any) -> str:
    if isinstance(key, str):
        return f"method .{key}()"
    return getattr(key, "__qualname__", None) or str(key)


def spelling_of(node: fx.Node, module: Optional[torch.nn.Module]) -> list[Any]:
    """Candidate keys of a node, most specific first."""
    if node.op == "call_module":
        return list(type(module).__mro__)
    if node.op == "call_method":
        return [str(node.target)]
    target = node.target
    keys = [target]
    if isinstance(target, torch._ops.OpOverload):
        keys.append(target.overloadpacket)
    return keys


def lookup(node: fx.Node, module: Optional[torch.nn.Module]) -> Optional[Callable]:
    if module is not None:
        quantization.register_torchao()  # torchao's observer classes exist once torchao is imported
    return _lookup(RULES, node, module)


def lookup_rewriter(node: fx.Node, module: Optional[torch.nn.Module]) -> Optional[Callable]:
    return _lookup(REWRITERS, node, module)


def lookup_resizer(module: torch.nn.Module) -> Optional[Callable]:
    for cls in type(module).__mro__:
        if cls in RESIZERS:
            return RESIZERS[cls]
    return None


def _lookup(table: dict, node: fx.Node, module: Optional[torch.nn.Module]) -> Optional[Callable]:
    for key in spelling_of(node, module):
        if key is torch.nn.Module or key is object:
            return None
        try:
            if key in table:
                return table[key]
        except TypeError:  # unhashable target
            return None
    return None


# Importing the families fills the tables.
from . import elementwise, conv, linear, norm, shape, pool, recurrent, attention, embedding, torchvision_ops, shuffle  # noqa: E402,F401,E501
from . import quantization  # noqa: E402  (after conv and linear: QAT layers extend them)
