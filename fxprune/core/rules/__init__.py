"""The rule table: one module per op family, each family one record written once for every spelling.

A spelling is a module class (``nn.Conv2d``), a function (``F.conv2d``, ``torch.cat``), a tensor method
name (``"view"``) or an ATen overload packet (``torch.ops.aten.conv2d``). Each family module registers one
:class:`~fxprune.core.registry.OpFamily`: for each set of spellings, its analysis rule
``(OpCall) -> channel map``, its literal-size rewrite and its module resize (see :mod:`fxprune.core.registry`). A node
whose spelling no family owns freezes its channels. Every module of this package is imported here, so a
new family is one new file (plus its test): see "Adding an op family" in README.md.
"""
from __future__ import annotations

import importlib
import pkgutil


def _import_families() -> None:
    """Import every module of this package, in name order: registering is what importing one does."""
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        importlib.import_module(f"{__name__}.{info.name}")


_import_families()
