"""The rule table: one module per op family, each family one record written once for every spelling.

A spelling is a module class (``nn.Conv2d``), a function (``F.conv2d``, ``torch.cat``), a tensor method
name (``"view"``) or an ATen overload packet (``torch.ops.aten.conv2d``). Each family module registers one
:class:`~fxprune.rules.registry.OpFamily`: for each set of spellings, its analysis rule
``(OpCall) -> channel map``, its literal-size rewrite and its module resize (see ``registry``). A node
whose spelling no family owns freezes its channels. Every module of this package is imported here, so a
new family is one new file (plus its test): see "Adding an op family" in README.md.
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import Callable, Optional

import torch
import torch.fx as fx

from .registry import (FAMILIES, OpFamily, OpRule, Resize, Rewrite, describe_spelling, lookup_resize,  # noqa: F401
                       lookup_rewrite, lookup_rule, register, register_late, resizer, rewriter, rule,
                       spelling_of)


def lookup(node: fx.Node, module: Optional[torch.nn.Module]) -> Optional[Callable]:
    """The analysis rule of a node (None: no family owns it, the node freezes its channels)."""
    found = lookup_rule(node, module)
    return None if found is None else found.analyze


def lookup_rewriter(node: fx.Node, module: Optional[torch.nn.Module]) -> Optional[Rewrite]:
    """The literal-size rewrite of a node whose sizes changed (raises when no family owns it)."""
    return lookup_rewrite(node, module)


def lookup_resizer(module: torch.nn.Module) -> Optional[Resize]:
    return lookup_resize(module)


def _import_families() -> None:
    """Import every module of this package, in name order: registering is what importing one does."""
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        importlib.import_module(f"{__name__}.{info.name}")


_import_families()
