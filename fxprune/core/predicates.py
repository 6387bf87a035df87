"""Small questions about graph values that rules, rewrite, verify and the passes all ask.

A leaf module (it imports nothing from fxprune), so any module may use it without an import cycle:

- :func:`is_tensor`: does a node produce a tensor (rather than a size, a tuple, a number)?
- :func:`is_quantizer`: is a module an observer or a fake-quantizer (torch.ao's, or torchao's once
  torchao is imported — importing it here would cost every user seconds)?

>>> is_tensor(3)
False
"""
from __future__ import annotations

import sys
from typing import Any

import torch
import torch.fx as fx
from torch.ao.quantization.fake_quantize import FakeQuantizeBase
from torch.ao.quantization.observer import ObserverBase


TORCHAO_QUANTIZERS = {"torchao.quantization.pt2e.observer": "ObserverBase",
                      "torchao.quantization.pt2e.fake_quantize": "FakeQuantizeBase"}
"""Module -> class name of torchao's quantizer bases (they do not derive from torch.ao's)."""



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
