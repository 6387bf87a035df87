"""Element-wise ops: activations, arithmetic, dropout, casts — channels pass straight through.

n-ary ops broadcast: a dim where two inputs both carry channels ties them position by position (a
residual add, squeeze-excitation gating); a dim where one input has no channels (a graph input, a tensor
built from literals) freezes the others'; a channel dim of size 1 broadcast against a wider one freezes
that single channel.
"""
from __future__ import annotations

import operator
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.fx as fx

from fxprune.core.opcall import OpCall
from fxprune.core.predicates import is_tensor
from fxprune.core.registry import OpFamily, OpRule, register

aten = torch.ops.aten

ACTIVATION_MODULES = (
    nn.ReLU, nn.RReLU, nn.Hardtanh, nn.ReLU6, nn.Sigmoid, nn.Hardsigmoid, nn.Tanh, nn.SiLU, nn.Mish,
    nn.Hardswish, nn.ELU, nn.CELU, nn.SELU, nn.Hardshrink, nn.LeakyReLU, nn.LogSigmoid, nn.Softplus,
    nn.Softsign, nn.Tanhshrink, nn.GELU, nn.Softshrink, nn.Threshold,
)  # nn.PReLU has per-channel weights: see norm.py
ACTIVATION_FUNCTIONS = (
    F.relu, F.rrelu, F.hardtanh, F.relu6, F.sigmoid, F.hardsigmoid, F.tanh, F.silu, F.mish,
    F.hardswish, F.elu, F.celu, F.selu, F.hardshrink, F.leaky_relu, F.logsigmoid, F.softplus,
    F.softsign, F.tanhshrink, F.gelu, F.relu_, F.elu_, F.leaky_relu_, F.hardtanh_, F.rrelu_,
    F.softshrink, F.threshold, torch.relu, torch.relu_, torch.sigmoid, torch.tanh, torch.selu,
    torch.celu, torch.rrelu,
)
PASS_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
                nn.FeatureAlphaDropout, nn.Identity)
PASS_FUNCTIONS = (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
                  F.feature_alpha_dropout, torch.dropout, torch.exp, torch.log, torch.abs, torch.neg,
                  torch.sqrt, torch.rsqrt, torch.square, torch.clone, torch.clamp, torch.clip,
                  torch.sin, torch.cos, torch.erf, torch.zeros_like, torch.ones_like, torch.empty_like,
                  torch.full_like, torch.rand_like, torch.randn_like, torch.nan_to_num, torch.detach,
                  torch.sign, torch.reciprocal, torch.exp2, torch.log1p, torch.expm1)
# Python's arithmetic operators (operator.add, .neg, .eq...) also compute sizes (``C // heads``): they
# belong to shape.py's shape_query, which hands tensor operands back to ``nary``.
PASS_METHODS = ("relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "exp", "log", "abs", "neg",
                "sqrt", "rsqrt", "square", "clone", "contiguous", "float", "half", "bfloat16", "double",
                "to", "type", "type_as", "detach", "clamp", "clamp_", "clamp_min", "clamp_max", "clip",
                "sin", "cos", "erf", "zero_", "fill_", "sign", "reciprocal", "requires_grad_", "cpu",
                "cuda", "nan_to_num", "hardtanh", "hardtanh_", "silu", "gelu", "exp_", "log1p")
PASS_ATEN = tuple(getattr(aten, n) for n in (
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "gelu", "gelu_", "silu", "silu_",
    "hardswish", "hardswish_", "hardsigmoid", "hardsigmoid_", "hardtanh", "hardtanh_", "leaky_relu",
    "leaky_relu_", "elu", "elu_", "celu", "celu_", "selu", "selu_", "softplus", "mish", "mish_",
    "hardshrink", "softshrink", "log_sigmoid", "logit", "rrelu", "rrelu_", "threshold", "threshold_",
    "dropout", "dropout_", "feature_dropout", "feature_dropout_", "alpha_dropout", "alpha_dropout_",
    "feature_alpha_dropout", "native_dropout", "clone", "contiguous", "_to_copy", "to", "alias",
    "detach", "detach_", "lift_fresh_copy", "abs", "neg", "exp", "log", "sqrt", "rsqrt", "square",
    "clamp", "clamp_", "clamp_min", "clamp_max", "sin", "cos", "erf", "sign", "reciprocal",
    "zeros_like", "ones_like", "empty_like", "full_like", "rand_like", "randn_like", "zero_",
    "fill_", "nan_to_num", "log1p", "expm1", "exp2", "type_as", "relu6",
    "logical_not", "bitwise_not", "isnan", "isinf",
) if hasattr(aten, n))
BINARY_FUNCTIONS = (operator.iadd, operator.isub, operator.imul, operator.itruediv,
                    torch.add, torch.sub, torch.mul, torch.div, torch.true_divide,
                    torch.maximum, torch.minimum, torch.where, torch.pow, torch.addcmul, torch.lerp,
                    torch.masked_fill, torch.eq, torch.ne, torch.lt, torch.gt, torch.le, torch.ge,
                    torch.fmod, torch.remainder, torch.atan2, torch.hypot, torch.logical_and,
                    torch.logical_or, operator.and_, operator.or_, operator.rshift, operator.lshift)
BINARY_METHODS = ("add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "pow", "pow_",
                  "masked_fill", "masked_fill_", "where", "maximum", "minimum", "addcmul", "lerp",
                  "eq", "ne", "lt", "gt", "le", "ge", "fmod", "remainder", "__and__", "__or__",
                  "logical_and", "logical_or", "copy_")
BINARY_ATEN = tuple(getattr(aten, n) for n in (
    "add", "add_", "sub", "sub_", "rsub", "mul", "mul_", "div", "div_", "pow", "pow_", "maximum",
    "minimum", "where", "masked_fill", "masked_fill_", "addcmul", "lerp", "eq", "ne", "lt", "gt",
    "le", "ge", "fmod", "remainder", "floor_divide", "logical_and", "logical_or", "bitwise_and",
    "bitwise_or", "copy_", "copy", "hypot", "atan2",
) if hasattr(aten, n))


def broadcast(op: OpCall, args: list) -> Any:
    """Channel map of an element-wise result over ``args`` (literals are ignored)."""
    out_shape = op.shape(op.node)
    numbers = [a for a in args if isinstance(a, fx.Node) and not is_tensor(a)]
    op.freeze([op.ids(a) for a in numbers], "a channel count used in tensor arithmetic")
    inputs = [(op.ids(a), op.shape(a)) for a in args if is_tensor(a)]
    return tuple(_broadcast_dim(op, inputs, out_shape, d) for d in range(len(out_shape)))


def _broadcast_dim(op: OpCall, inputs: list, out_shape: tuple, d: int) -> Any:
    arrays, fixed = [], False
    for ids, shape in inputs:
        k = d - (len(out_shape) - len(shape))
        if k < 0:
            continue
        if shape[k] != out_shape[d]:  # size-1 broadcast: that one channel can never go
            op.freeze(ids[k], "a channel broadcast across a channel dim")
        elif ids[k] is None:
            fixed = True
        else:
            arrays.append(ids[k])
    if fixed:
        op.freeze(arrays, "element-wise with a tensor that has no channels on this dim")
        return None
    for other in arrays[1:]:
        op.unify(arrays[0], other)
    return arrays[0] if arrays else None


def unary(op: OpCall) -> Any:
    # f(x) -> f(x): channels pass through
    x = op.arg(0, "input")
    if not is_tensor(x):
        x = op.arg(0, "self")
    if not is_tensor(x) or op.shape(x) != op.shape(op.node):
        return broadcast(op, [x])
    return op.ids(x)


def assert_metadata(op: OpCall) -> Any:
    # _assert_tensor_metadata(x, size, stride, dtype, ...): a size or stride check pins the channels
    if op.arg(1, "size") is not None or op.arg(2, "stride") is not None:
        op.freeze(op.ids(op.arg(0, "a")), "a tensor whose sizes are asserted")
    return None


def nary(op: OpCall) -> Any:
    # a + b, a * gate, where(c, a, b): tie channels position by position
    args = list(op.node.args) + list(op.node.kwargs.values())
    return broadcast(op, args)


def glu(op: OpCall) -> Any:
    # glu(x, dim) = a * sigmoid(b), a and b the halves of dim: channels i and C/2 + i are one unit
    x_ids = op.ids(op.arg(0, "input"))
    dim = op.module.dim if op.module is not None else op.value(op.arg(1, "dim", -1))
    d = dim % len(x_ids)
    if x_ids[d] is None:
        return x_ids
    halves = x_ids[d].view(2, -1)
    op.unify(halves[0], halves[1], f"the gated halves of a GLU at {op.where()}")
    return tuple(halves[0] if i == d else ids for i, ids in enumerate(x_ids))


def _torchvision_pass_through() -> tuple:
    try:
        from torchvision.ops import stochastic_depth
        from torchvision.ops.misc import Permute  # noqa: F401
        from torchvision.ops import StochasticDepth
    except ImportError:  # torchvision is optional
        return ()
    return (stochastic_depth, StochasticDepth)


def stochastic_depth(op: OpCall) -> Any:
    # stochastic_depth(x, p, mode, training): scales whole samples or rows, never mixes channels
    return op.ids(op.arg(0, "input"))


FAMILY = register(OpFamily("elementwise", (
    # f(x) -> f(x): channels pass through
    OpRule((*ACTIVATION_MODULES, *PASS_MODULES, *ACTIVATION_FUNCTIONS, *PASS_FUNCTIONS, *PASS_METHODS,
           *PASS_ATEN), unary, rewrite=None),
    # _assert_tensor_metadata(x, size, stride, dtype, ...): a size or stride check pins the channels
    OpRule((aten._assert_tensor_metadata,), assert_metadata, rewrite=None),
    # a + b, a * gate, where(c, a, b): tie channels position by position
    OpRule((*BINARY_FUNCTIONS, *BINARY_METHODS, *BINARY_ATEN), nary, rewrite=None),
    # glu(x, dim) = a * sigmoid(b), a and b the halves of dim: channels i and C/2 + i are one unit
    OpRule((nn.GLU, F.glu, aten.glu), glu, rewrite=None),
    # stochastic_depth(x, p, mode, training): scales whole samples or rows, never mixes channels
    OpRule(_torchvision_pass_through(), stochastic_depth, rewrite=None),
)))
