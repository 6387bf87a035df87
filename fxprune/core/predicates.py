"""Small questions about graph values that rules, rewrite, verify and the passes all ask.

A leaf module (it imports nothing from fxprune), so any module may use it without an import cycle:

- :func:`is_tensor`: does a node produce a tensor (rather than a size, a tuple, a number)?
- :func:`is_quantizer`: is a module an observer or a fake-quantizer (torch.ao's, or torchao's once
  torchao is imported — importing it here would cost every user seconds)?
- :func:`weight_source`: the ``get_attr`` a weight argument is read from, seen through quantizers and the
  broadcast scaling of a folded BatchNorm.

>>> is_tensor(3)
False
"""
from __future__ import annotations

import operator
import sys
from typing import Any

import torch
import torch.fx as fx
from torch.ao.quantization.fake_quantize import FakeQuantizeBase
from torch.ao.quantization.observer import ObserverBase

aten = torch.ops.aten

TORCHAO_QUANTIZERS = {"torchao.quantization.pt2e.observer": "ObserverBase",
                      "torchao.quantization.pt2e.fake_quantize": "FakeQuantizeBase"}
"""Module -> class name of torchao's quantizer bases (they do not derive from torch.ao's)."""
SCALES = (aten.mul.Tensor, aten.div.Tensor, torch.mul, torch.div, operator.mul, operator.truediv)
"""Scaling a weight by a broadcast factor (QAT's folded BatchNorm: ``w * (gamma / sigma)``) keeps its
channels."""


def is_tensor(value: Any) -> bool:
    """Whether ``value`` is a node whose traced value is a tensor."""
    if not isinstance(value, fx.Node):
        return False
    val = value.meta.get("val", value.meta.get("example_value"))
    return isinstance(val, torch.Tensor)


def torchao_quantizers() -> dict[str, type]:
    """torchao's loaded quantizer bases, by class name (empty while torchao is not imported)."""
    found = {attr: getattr(sys.modules.get(name), attr, None) for name, attr in TORCHAO_QUANTIZERS.items()}
    return {attr: cls for attr, cls in found.items() if cls is not None}


def is_quantizer(module: Any) -> bool:
    """An observer or a fake-quantizer, torch.ao's or (once imported) torchao's."""
    return isinstance(module, (ObserverBase, FakeQuantizeBase, *torchao_quantizers().values()))


def weight_source(node: Any, gm: fx.GraphModule) -> Any:
    """The ``get_attr`` a weight argument is read from, through quantizers and broadcast scaling
    (``fake_quant(w * (gamma / sigma))`` after ``prepare_qat_pt2e``); else ``node`` itself."""
    while isinstance(node, fx.Node) and node.op != "get_attr":
        if node.op == "call_module" and is_quantizer(gm.get_submodule(node.target)):
            node = node.args[0]
        elif node.op == "call_function" and node.target in SCALES and _scales(node):
            node = node.args[0]
        else:
            return node
    return node


def _scales(node: fx.Node) -> bool:
    """``a * s`` or ``a / s`` where ``s`` broadcasts to ``a``'s shape (fewer elements, same rank)."""
    a, s = node.args[0], node.args[1]
    if not (isinstance(a, fx.Node) and isinstance(s, fx.Node)):
        return False
    va, vs = a.meta.get("val"), s.meta.get("val")
    if not (isinstance(va, torch.Tensor) and isinstance(vs, torch.Tensor)) or va.dim() != vs.dim():
        return False
    return all(b in (1, n) for b, n in zip(vs.shape, va.shape)) and vs.numel() < va.numel()
