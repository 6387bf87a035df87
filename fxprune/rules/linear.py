"""Linear layers and matrix products.

``linear(x, W[out, in])``: W's rows produce the output features, x's last dim is contracted against W's
columns. ``a @ b`` ties a's last dim to b's second-to-last (the contraction: verify masks a's dropped
positions), keeps a's rows and b's columns, and broadcasts batch dims. A matrix product with a loose
parameter (``x @ self.weight``) makes that parameter's free dim a producer.
"""
from __future__ import annotations

import operator
from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..analysis import OpCall, Unsupported
from . import resizer, rule

aten = torch.ops.aten


def linear(op: OpCall, x: Any, w_key: Optional[str], b_key: Optional[str]) -> Any:
    if w_key is None:
        raise Unsupported("a linear whose weight is computed in the graph")
    w = op.param(w_key)
    out_ids = op.produce(w_key, 0)
    x_ids = op.ids(x)
    op.unify(x_ids[-1], w[1])
    op.consume_param(w_key, 1)
    if b_key is not None:
        op.unify(op.param(b_key)[0], out_ids)
    return tuple(x_ids[:-1]) + (out_ids,)


@rule(nn.Linear)
def linear_module(op: OpCall) -> Any:
    bias = f"{op.node.target}.bias" if op.module.bias is not None else None
    return linear(op, op.arg(0, "input"), f"{op.node.target}.weight", bias)


@rule(F.linear, aten.linear)
def linear_function(op: OpCall) -> Any:
    # linear(input, weight, bias)
    return linear(op, op.arg(0, "input"), op.param_key(op.arg(1, "weight")),
                  op.param_key(op.arg(2, "bias")))


@rule(operator.matmul, torch.matmul, torch.mm, torch.bmm, "matmul", "mm", "bmm", "__matmul__",
      aten.matmul, aten.mm, aten.bmm)
def matmul(op: OpCall) -> Any:
    # a[..., n, k] @ b[..., k, m] -> [..., n, m]
    a, b = op.arg(0, "input"), op.arg(1, "other")
    a_ids, b_ids = op.ids(a), op.ids(b)
    if len(a_ids) < 2 or len(b_ids) < 2:
        raise Unsupported("a matrix-vector product")
    b_ids = _produce_loose(op, b, b_ids)
    op.unify(a_ids[-1], b_ids[-2], f"contracted against a fixed dim at {op.where()}")
    op.consume_act(0, len(a_ids) - 1, a_ids[-1])
    batch = _batch_dims(op, a, b, a_ids, b_ids)
    return batch + (a_ids[-2], b_ids[-1])


def _produce_loose(op: OpCall, b: Any, b_ids: tuple) -> tuple:
    """``x @ self.weight``: the parameter's columns create channels."""
    key = op.param_key(b)
    if key is None:
        return b_ids
    op.produce(key, len(b_ids) - 1)
    return b_ids


def _batch_dims(op: OpCall, a: Any, b: Any, a_ids: tuple, b_ids: tuple) -> tuple:
    out_shape = op.shape(op.node)
    n = len(out_shape) - 2
    a_shape, b_shape = op.shape(a)[:-2], op.shape(b)[:-2]
    dims = []
    for d in range(n):
        sides = []
        for ids, shape in ((a_ids[:-2], a_shape), (b_ids[:-2], b_shape)):
            k = d - (n - len(shape))
            if k >= 0 and shape[k] == out_shape[d]:
                sides.append(ids[k])
            elif k >= 0:
                op.freeze(ids[k], "a channel broadcast across a batch dim of a matmul")
        if len(sides) == 2:
            op.unify(sides[0], sides[1])
        dims.append(sides[0] if sides else None)
    return tuple(dims)


@resizer(nn.Linear)
def resize_linear(old: nn.Module, new: nn.Module, rw) -> None:
    new.out_features, new.in_features = new.weight.shape
