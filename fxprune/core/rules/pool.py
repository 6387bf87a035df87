"""Pooling, resampling, padding and reductions.

Pooling, interpolation and padding work per channel: the leading dims (batch and channel, or only the
channel of an unbatched input) pass through; the pooled or padded dims carry none (channels there freeze).
A reduction over non-channel dims passes the channels on. A *sum* over a channel dim is a contraction —
exact, and verify masks its input. A hand-written norm's statistic over channels (``mean(x**2)`` of an
RMS norm, ``x - mean(x)``, ``var(x)``) lets them through like LayerNorm: it is recorded with its
kept-only form, which verify's reference computes. Any other mean, max, softmax or norm over a channel
dim (CBAM's channel mean) depends on how many channels there are, so it freezes them.
"""
from __future__ import annotations

import operator
import re
from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.fx as fx

from fxprune.core import kept_norms as kept_only
from fxprune.core.opcall import OpCall
from fxprune.core.registry import OpFamily, OpRule, register

aten = torch.ops.aten

POOL_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
                nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
                nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.LPPool1d,
                nn.LPPool2d, nn.LPPool3d, nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d,
                nn.FractionalMaxPool2d, nn.FractionalMaxPool3d)
POOL_FUNCTIONS = (F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d,
                  F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
                  F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d, F.lp_pool1d,
                  F.lp_pool2d, F.lp_pool3d, F.interpolate, F.upsample, F.max_pool2d_with_indices,
                  torch.max_pool2d, torch.avg_pool1d, torch.adaptive_avg_pool1d)
POOL_ATEN = tuple(getattr(aten, n) for n in (
    "max_pool1d", "max_pool2d", "max_pool3d", "max_pool2d_with_indices", "max_pool3d_with_indices",
    "avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d", "adaptive_avg_pool2d",
    "adaptive_avg_pool3d", "_adaptive_avg_pool2d", "_adaptive_avg_pool3d", "adaptive_max_pool1d",
    "adaptive_max_pool2d", "adaptive_max_pool3d", "upsample_nearest1d", "upsample_nearest2d",
    "upsample_nearest3d", "upsample_bilinear2d", "upsample_bicubic2d", "upsample_linear1d",
    "upsample_trilinear3d", "_upsample_nearest_exact1d", "_upsample_nearest_exact2d",
    "_upsample_nearest_exact3d", "_upsample_bilinear2d_aa", "_upsample_bicubic2d_aa",
    "lp_pool1d", "lp_pool2d", "lp_pool3d",
) if hasattr(aten, n))  # not aten's fractional_max_pool: its random samples have a literal channel count
PAD_MODULES = (nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d, nn.ConstantPad2d,
               nn.ConstantPad3d, nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReflectionPad3d,
               nn.ReplicationPad1d, nn.ReplicationPad2d, nn.ReplicationPad3d, nn.CircularPad1d,
               nn.CircularPad2d, nn.CircularPad3d)
PAD_ATEN = tuple(getattr(aten, n) for n in (
    "pad", "constant_pad_nd", "reflection_pad1d", "reflection_pad2d", "reflection_pad3d",
    "replication_pad1d", "replication_pad2d", "replication_pad3d", "_pad_circular",
) if hasattr(aten, n))


def _spatial_dims(op: OpCall, ndim: int) -> int:
    """How many trailing dims the op pools or resamples: the ``Nd`` of its name, else all but (N, C)."""
    name = type(op.module).__name__ if op.module is not None else str(getattr(op.node.target, "__name__",
                                                                              op.node.target))
    found = re.search(r"([123])d", name)
    return int(found.group(1)) if found else ndim - 2


def pool(op: OpCall) -> Any:
    # pool(x[..., *spatial]): each leading dim (batch, channel; only channel when unbatched) passes
    # through; positions along the pooled dims are mixed, so channels there freeze
    x_ids = op.ids(op.arg(0, "input"))
    lead = len(x_ids) - _spatial_dims(op, len(x_ids))
    op.freeze(list(x_ids[lead:]), "pooling or resampling along a channel dim")
    ids = tuple(x_ids[:lead]) + (None,) * (len(x_ids) - lead)
    if isinstance(op.out, (tuple, list)):  # max_pool with indices
        return tuple(ids for _ in op.out)
    return ids


def pad(op: OpCall) -> Any:
    # pad(x, [l, r, t, b, ...]): padded dims are resized, so they must not carry channels
    x = op.arg(0, "input")
    x_ids = op.ids(x)
    widths = op.module.padding if op.module is not None else op.value(op.arg(1, "pad"))
    padded = {len(x_ids) - 1 - i // 2 for i, w in enumerate(widths) if w != 0}
    op.freeze([x_ids[d] for d in padded], "padding along a channel dim")
    return tuple(None if d in padded else ids for d, ids in enumerate(x_ids))


def _reduced_dims(op: OpCall, n: int, dims: Any) -> list[int]:
    if dims is None or dims == []:
        return list(range(n))
    dims = [dims] if isinstance(dims, int) else list(dims)
    return sorted(d % n for d in dims)


def reduction(op: OpCall, exact: bool) -> Any:
    x_ids = op.ids(op.arg(0, "input"))
    dims = _reduced_dims(op, len(x_ids), op.value(op.arg(1, "dim")))
    for d in dims:
        if x_ids[d] is None:
            continue
        if exact:  # sum over channels: a contraction, exact
            op.consume_act(0, d, x_ids[d])
        else:
            op.freeze(x_ids[d], "a mean/max/norm over a channel dim")
    return _reduced_ids(op, x_ids, dims, bool(op.value(op.arg(2, "keepdim", False))))


def _reduced_ids(op: OpCall, x_ids: tuple, dims: list[int], keepdim: bool) -> Any:
    out = [None if d in dims else ids for d, ids in enumerate(x_ids)]
    if not keepdim:
        out = [ids for d, ids in enumerate(out) if d not in dims]
    result = tuple(out)
    if isinstance(op.out, (tuple, list)):  # max(dim) -> (values, indices), var_mean -> (var, mean)
        return (result, result)
    return result


def sum_(op: OpCall) -> Any:
    # x.sum(dim): exact over channels
    return reduction(op, exact=True)


def statistic(op: OpCall) -> Any:
    # x.mean(dim): over a channel dim the result depends on how many channels there are
    if not isinstance(op.out, (torch.Tensor, tuple, list)) or (
            op.arg(1, "dim") is not None and not isinstance(op.value(op.arg(1, "dim")), (int, list, tuple))):
        return _binary_minmax(op)
    _record_moment(op)
    if _is_norm_statistic(op):
        return _norm_statistic(op)
    return reduction(op, exact=False)


SQUARES = ("pow", "square", "mul", torch.pow, torch.square, torch.mul, operator.pow, operator.mul,
           aten.pow.Tensor_Scalar, aten.square.default, aten.mul.Tensor)
CENTERS = ("sub", torch.sub, operator.sub, aten.sub.Tensor)
CASTS = ("float", "to", "type", "type_as", aten._to_copy.default, aten.to.dtype)


def _is_norm_statistic(op: OpCall) -> bool:
    """A hand-written norm's statistic, treated like LayerNorm's: ``mean(x**2)`` (RMSNorm, a variance),
    ``x - mean(x)`` (centring), ``var(x)`` / ``std(x)``. Any other mean over channels is a feature
    (CBAM's channel mean, a max) and freezes them, since it is not a normalisation a user expects to
    follow the kept channels."""
    name = _moment_name(op)
    if name != "mean":  # var/std normalise; a max, min, prod or logsumexp never does
        return name is not None
    x = _uncast(op.arg(0, "input"))
    if isinstance(x, fx.Node) and x.target in SQUARES and _squares(x):
        return True
    return any(user.target in CENTERS and user.args and user.args[1] is op.node
               and _uncast(user.args[0]) is x for user in op.node.users)


def _uncast(value: Any) -> Any:
    while isinstance(value, fx.Node) and value.target in CASTS:
        value = value.args[0]
    return value


def _squares(node: fx.Node) -> bool:
    if node.target in ("square", torch.square, aten.square.default):
        return True
    a, b = (list(node.args) + [node.kwargs.get("exponent", node.kwargs.get("other"))])[:2]
    return b == 2 or (isinstance(a, fx.Node) and a is b)


def _norm_statistic(op: OpCall) -> Any:
    """Channels pass through the statistic like LayerNorm's (recorded for verify's kept-only
    reference); the reduced dims carry none afterwards."""
    x_ids = op.ids(op.arg(0, "input"))
    dim, _, keepdim = _statistic_args(op)
    dims = _reduced_dims(op, len(x_ids), dim)
    for d in dims:
        op.approximate(x_ids[d])
    return _reduced_ids(op, x_ids, dims, keepdim)


KEPT_MOMENTS = {"mean": kept_only.kept_mean, "var": kept_only.kept_var, "std": kept_only.kept_std,
                "var_mean": kept_only.kept_var_mean, "std_mean": kept_only.kept_std_mean}


def _record_moment(op: OpCall) -> None:
    """A mean, variance or standard deviation over channels is recorded with its kept-only form, so
    verify's reference is exact wherever a rule lets channels through one (an RMS norm written as
    ``x * rsqrt(mean(x**2))``); where the channels freeze, nothing is dropped and the site is inert."""
    name = _moment_name(op)
    if name is None:
        return
    x = op.arg(0, "input")
    dim, correction, keepdim = _statistic_args(op)
    dims = _reduced_dims(op, len(op.shape(x)), dim)
    if name == "mean":
        op.normalizes(KEPT_MOMENTS[name], x, dims, dim, keepdim, op.node.kwargs.get("dtype"))
    else:
        op.normalizes(KEPT_MOMENTS[name], x, dims, dim, correction, keepdim)


def _moment_name(op: OpCall) -> Optional[str]:
    """``"mean"``, ``"var"``, ``"std"``, ``"var_mean"`` or ``"std_mean"`` for any spelling of one
    (``x.var``, ``torch.var``, ``aten.var.correction``...), else None."""
    name = str(op.node.target) if op.node.op == "call_method" else getattr(op.node.target, "__name__", "")
    name = name.split(".")[0]
    return name if name in KEPT_MOMENTS else None


def _statistic_args(op: OpCall) -> tuple[Any, Any, bool]:
    """``(dim, correction, keepdim)`` of a mean (correction None) or of a var/std (:func:`_moment_args`)."""
    if _moment_name(op) == "mean":
        return op.value(op.arg(1, "dim")), None, bool(op.value(op.arg(2, "keepdim", False)))
    return _moment_args(op)


def _moment_args(op: OpCall) -> tuple[Any, float, bool]:
    """``(dim, correction, keepdim)`` of any spelling of var/std: ``x.var(dim, unbiased, keepdim)``,
    ``x.var(unbiased)``, ``torch.var(x, dim, correction=0, keepdim=True)``, ``aten.var.correction``..."""
    args, kwargs = [op.value(a) for a in op.node.args[1:]], op.node.kwargs
    dim, unbiased, keepdim = None, True, False
    if args and not isinstance(args[0], bool):
        dim = args.pop(0)
    if args and isinstance(args[0], bool):
        unbiased = args.pop(0)
    if args:
        keepdim = bool(args.pop(0))
    correction = kwargs.get("correction")
    correction = int(kwargs.get("unbiased", unbiased)) if correction is None else correction
    return kwargs.get("dim", dim), correction, bool(kwargs.get("keepdim", keepdim))


def _binary_minmax(op: OpCall) -> Any:
    from fxprune.core.rules.elementwise import nary
    return nary(op)


def vector_norm(op: OpCall) -> Any:
    # vector_norm(x, ord, dim, keepdim) / normalize(x, p, dim): a norm over a channel dim freezes it
    x = op.arg(0, "input")
    x_ids = op.ids(x)
    if op.node.target is F.normalize:
        p, dim, eps = op.arg(1, "p", 2.0), op.value(op.arg(2, "dim", 1)), op.arg(3, "eps", 1e-12)
        op.normalizes(kept_only.kept_normalize, x, (dim,), p, dim, eps)
        op.freeze(x_ids[dim % len(x_ids)], "a norm over a channel dim")
        return x_ids
    dims = _reduced_dims(op, len(x_ids), op.value(op.arg(2, "dim")))
    op.normalizes(kept_only.kept_vector_norm, x, dims, op.arg(1, "ord", 2), op.value(op.arg(2, "dim")),
                  bool(op.value(op.arg(3, "keepdim", False))))
    op.freeze([x_ids[d] for d in dims], "a norm over a channel dim")
    keepdim = bool(op.value(op.arg(3, "keepdim", False)))
    out = [None if d in dims else ids for d, ids in enumerate(x_ids)]
    return tuple(out if keepdim else [ids for d, ids in enumerate(out) if d not in dims])


def softmax(op: OpCall) -> Any:
    # softmax(x, dim): normalises along dim, so channels on that dim must stay
    x = op.arg(0, "input")
    x_ids = op.ids(x)
    dim = op.module.dim if op.module is not None else op.value(op.arg(1, "dim"))
    dim = dim if dim is not None else len(x_ids) - 1
    op.freeze(x_ids[dim % len(x_ids)], "a softmax/cumsum along a channel dim")
    return x_ids


FAMILY = register(OpFamily("pool", (
    # pool(x[..., *spatial]): each leading dim (batch, channel; only channel when unbatched) passes
    OpRule((*POOL_MODULES, *POOL_FUNCTIONS, *POOL_ATEN), pool, rewrite=None),
    # pad(x, [l, r, t, b, ...]): padded dims are resized, so they must not carry channels
    OpRule((F.pad, *PAD_MODULES, *PAD_ATEN), pad, rewrite=None),
    # x.sum(dim): exact over channels
    OpRule(("sum", torch.sum, aten.sum), sum_, rewrite=None),
    # x.mean(dim): over a channel dim the result depends on how many channels there are
    OpRule(("mean", "amax", "amin", "max", "min", "std", "var", "norm", "logsumexp", "prod", "argmax",
           "argmin", "all", "any", torch.mean, torch.amax, torch.amin, torch.std, torch.var, torch.logsumexp,
           torch.prod, torch.argmax, torch.argmin, torch.max, torch.min, aten.mean, aten.amax, aten.amin,
           aten.std, aten.var, aten.logsumexp, aten.prod, aten.argmax, aten.argmin, aten.max, aten.min,
           aten.var_mean, aten.std_mean), statistic, rewrite=None),
    # vector_norm(x, ord, dim, keepdim) / normalize(x, p, dim): a norm over a channel dim freezes it
    OpRule((torch.linalg.vector_norm, aten.linalg_vector_norm, F.normalize), vector_norm, rewrite=None),
    # softmax(x, dim): normalises along dim, so channels on that dim must stay
    OpRule(("softmax", "log_softmax", "cumsum", F.softmax, F.log_softmax, torch.softmax, torch.log_softmax,
           torch.cumsum, nn.Softmax, nn.LogSoftmax, aten.softmax, aten._softmax, aten.log_softmax,
           aten._log_softmax, aten.cumsum), softmax, rewrite=None),
)))
