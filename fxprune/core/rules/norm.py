"""Normalisation layers and PReLU.

BatchNorm and InstanceNorm keep per-channel statistics: exact, their parameters and running buffers follow
the channel. GroupNorm with G > 1 is pruned by whole groups (each group's statistics stay as they were:
exact). LayerNorm, RMSNorm and GroupNorm(1, C) mix the channels they normalise over: the pruned norm's
statistics run over the kept channels only, so the group is marked approximate (its output drifts from
the original's), and each such norm is recorded (``op.normalizes``) with its kept-only counterpart from
:mod:`fxprune.core.kept_norms`, which verify's reference runs in its place. PReLU with one weight per channel
follows the channel.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from fxprune.core import kept_norms as kept_only
from fxprune.core.opcall import OpCall, Unsupported
from fxprune.core.registry import OpFamily, OpRule, register

aten = torch.ops.aten

BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
               nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)


def _channel_dim(op: OpCall, x: Any) -> int:
    return _channel_dim_of(op.module, len(op.shape(x)))


def _channel_dim_of(module: Any, ndim: int) -> int:
    if isinstance(module, nn.modules.instancenorm._InstanceNorm):  # accepts unbatched (C, *spatial)
        return 0 if ndim == module._get_no_batch_dim() else 1
    return 1 if ndim > 1 else 0


def per_channel(op: OpCall, x: Any, params: list) -> Any:
    """Per-channel statistics and affine parameters: tie each 1-d parameter to the channel dim."""
    x_ids = op.ids(x)
    c = _channel_dim(op, x)
    for p in params:
        p_ids = op.ids(p) if not isinstance(p, str) else op.param(p)
        if p_ids is not None:
            op.unify(x_ids[c], p_ids[0])
    return x_ids


def _module_params(op: OpCall, names: tuple[str, ...]) -> list[str]:
    return [f"{op.node.target}.{n}" for n in names if getattr(op.module, n, None) is not None]


def batch_norm_module(op: OpCall) -> Any:
    names = ("weight", "bias", "running_mean", "running_var")
    return per_channel(op, op.arg(0, "input"), _module_params(op, names))


def batch_norm_function(op: OpCall) -> Any:
    # batch_norm(input, running_mean, running_var, weight, bias, ...)
    params = [op.arg(i, n) for i, n in ((1, "running_mean"), (2, "running_var"), (3, "weight"),
                                        (4, "bias"))]
    return per_channel(op, op.arg(0, "input"), params)


def batch_norm_aten(op: OpCall) -> Any:
    # batch_norm(input, weight, bias, running_mean, running_var, ...); some overloads return tuples
    params = [op.arg(i) for i in range(1, 5)]
    out = per_channel(op, op.arg(0, "input"), params)
    if isinstance(op.out, (tuple, list)):
        return (out,) + tuple(op.fixed(v) for v in op.out[1:])
    return out


def layer_norm(op: OpCall, x: Any, ndims: int, params: list) -> Any:
    """Normalise over the last ``ndims`` dims: approximate where they carry channels."""
    x_ids = op.ids(x)
    for k in range(1, ndims + 1):
        op.approximate(x_ids[-k])
    for p in params:
        p_ids = op.ids(p) if not isinstance(p, str) else op.param(p)
        if p_ids is None:
            continue
        for k in range(1, ndims + 1):
            op.unify(x_ids[-k], p_ids[-k])
    return x_ids


def layer_norm_module(op: OpCall) -> Any:
    x, ndims = op.arg(0, "input"), len(op.module.normalized_shape)
    weight, bias = (f"{op.node.target}.{n}" if getattr(op.module, n, None) is not None else None
                    for n in ("weight", "bias"))
    if isinstance(op.module, nn.RMSNorm):
        op.normalizes(kept_only.kept_rms_norm, x, _last(ndims), ndims, weight, op.module.eps)
    else:
        op.normalizes(kept_only.kept_layer_norm, x, _last(ndims), ndims, weight, bias, op.module.eps)
    return layer_norm(op, x, ndims, _module_params(op, ("weight", "bias")))


def _last(ndims: int) -> range:
    return range(-ndims, 0)


def layer_norm_function(op: OpCall) -> Any:
    # layer_norm(input, normalized_shape, weight, bias, eps) / rms_norm(input, normalized_shape, weight, eps)
    x, ndims = op.arg(0, "input"), len(op.value(op.arg(1, "normalized_shape")))
    weight = op.arg(2, "weight")
    if op.node.target in (F.rms_norm, aten.rms_norm.default):
        op.normalizes(kept_only.kept_rms_norm, x, _last(ndims), ndims, weight, op.arg(3, "eps"))
        return layer_norm(op, x, ndims, [weight])
    bias, eps = op.arg(3, "bias"), op.arg(4, "eps", 1e-5)
    native = op.node.target == aten.native_layer_norm.default
    kept = kept_only.kept_native_layer_norm if native else kept_only.kept_layer_norm
    op.normalizes(kept, x, _last(ndims), ndims, weight, bias, eps)
    out = layer_norm(op, x, ndims, [weight, bias])
    if isinstance(op.out, (tuple, list)):
        return (out,) + tuple(op.fixed(v) for v in op.out[1:])
    return out


def rewrite_layer_norm(rw) -> None:
    ndims = len(rw.arg(1, "normalized_shape"))
    rw.set_arg(1, "normalized_shape", list(rw.new_input_shape(0)[-ndims:]))


def group_norm(op: OpCall, x: Any, groups: int, params: list) -> Any:
    x_ids = op.ids(x)
    c = _channel_dim(op, x)
    if x_ids[c] is not None and groups > 1:
        # GroupNorm(G>1) -> each group's channels are one unit: statistics unchanged, exact
        unit = x_ids[c].view(groups, -1)[:, 0]
        op.unify(x_ids[c], unit.repeat_interleave(x_ids[c].numel() // groups))
    elif x_ids[c] is not None:
        op.approximate(x_ids[c])
    return per_channel(op, x, params)


def group_norm_module(op: OpCall) -> Any:
    x, groups = op.arg(0, "input"), op.module.num_groups
    weight, bias = (f"{op.node.target}.{n}" if getattr(op.module, n, None) is not None else None
                    for n in ("weight", "bias"))
    op.normalizes(kept_only.kept_group_norm, x, (1,), groups, weight, bias, op.module.eps)
    return group_norm(op, x, groups, _module_params(op, ("weight", "bias")))


def group_norm_function(op: OpCall) -> Any:
    # group_norm(input, num_groups, weight, bias, eps)
    x, groups = op.arg(0, "input"), op.value(op.arg(1, "num_groups"))
    weight, bias = op.arg(2, "weight"), op.arg(3, "bias")
    op.normalizes(kept_only.kept_group_norm, x, (1,), groups, weight, bias, op.arg(4, "eps", 1e-5))
    return group_norm(op, x, groups, [weight, bias])


def native_group_norm(op: OpCall) -> Any:
    # native_group_norm(input, weight, bias, N, C, HxW, group, eps) -> (out, mean, rstd)
    x, groups = op.arg(0), op.value(op.arg(6))
    op.normalizes(kept_only.kept_native_group_norm, x, (1,), op.arg(1), op.arg(2), groups, op.arg(7))
    out = group_norm(op, x, groups, [op.arg(1), op.arg(2)])
    return (out,) + tuple(op.fixed(v) for v in op.out[1:])


def _scaled_groups(rw, groups: int, c_old: int, c_new: int) -> int:
    return groups * c_new // c_old if groups > 1 else 1


def rewrite_group_norm(rw) -> None:
    c_old, c_new = rw.old_input_shape(0)[1], rw.new_input_shape(0)[1]
    rw.set_arg(1, "num_groups", _scaled_groups(rw, rw.arg(1, "num_groups"), c_old, c_new))


def rewrite_native_group_norm(rw) -> None:
    c_old, c_new = rw.old_input_shape(0)[1], rw.new_input_shape(0)[1]
    rw.set_arg(4, "C", c_new)
    rw.set_arg(6, "group", _scaled_groups(rw, rw.arg(6, "group"), c_old, c_new))


def prelu(op: OpCall, x: Any, w: Any) -> Any:
    w_ids = op.ids(w)
    if w_ids is None or op.shape(w) == (1,) or len(op.shape(w)) == 0:
        return op.ids(x)  # one shared slope: a plain activation
    return per_channel(op, x, [w])


def prelu_module(op: OpCall) -> Any:
    x = op.arg(0, "input")
    if op.module.num_parameters == 1:
        return op.ids(x)
    x_ids = op.ids(x)
    op.unify(x_ids[_channel_dim(op, x)], op.param(f"{op.node.target}.weight")[0])
    return x_ids


def prelu_function(op: OpCall) -> Any:
    return prelu(op, op.arg(0, "input"), op.arg(1, "weight"))


def resize_batch_norm(old: nn.Module, new: nn.Module, rw) -> None:
    shape = rw.new_input_shape(0)
    new.num_features = shape[_channel_dim_of(old, len(shape))]


def resize_layer_norm(old: nn.Module, new: nn.Module, rw) -> None:
    ndims = len(old.normalized_shape)
    new.normalized_shape = tuple(rw.new_input_shape(0)[-ndims:])


def resize_group_norm(old: nn.Module, new: nn.Module, rw) -> None:
    new.num_channels = rw.new_input_shape(0)[1]
    new.num_groups = _scaled_groups(rw, old.num_groups, old.num_channels, new.num_channels)


def resize_prelu(old: nn.Module, new: nn.Module, rw) -> None:
    new.num_parameters = new.weight.numel()


__all__ = ["per_channel", "layer_norm", "group_norm", "Unsupported"]


FAMILY = register(OpFamily("norm", (
    OpRule(BATCH_NORMS, batch_norm_module, rewrite=None, resize=resize_batch_norm),
    # batch_norm(input, running_mean, running_var, weight, bias, ...)
    OpRule((F.batch_norm, F.instance_norm), batch_norm_function, rewrite=None),
    # batch_norm(input, weight, bias, running_mean, running_var, ...); some overloads return tuples
    OpRule((aten.batch_norm, aten.instance_norm, aten._native_batch_norm_legit_no_training,
           aten._native_batch_norm_legit, aten.native_batch_norm, aten._batch_norm_with_update,
           aten._batch_norm_no_update, aten.cudnn_batch_norm, aten._native_batch_norm_legit_functional),
           batch_norm_aten, rewrite=None),
    OpRule((nn.LayerNorm, nn.RMSNorm), layer_norm_module, rewrite=None, resize=resize_layer_norm),
    # layer_norm(input, normalized_shape, weight, bias, eps) / rms_norm(input, normalized_shape, weight, eps)
    OpRule((F.layer_norm, F.rms_norm, aten.layer_norm, aten.native_layer_norm, aten.rms_norm),
           layer_norm_function, rewrite=rewrite_layer_norm),
    OpRule((nn.GroupNorm,), group_norm_module, rewrite=None, resize=resize_group_norm),
    # group_norm(input, num_groups, weight, bias, eps)
    OpRule((F.group_norm, aten.group_norm), group_norm_function, rewrite=rewrite_group_norm),
    # native_group_norm(input, weight, bias, N, C, HxW, group, eps) -> (out, mean, rstd)
    OpRule((aten.native_group_norm,), native_group_norm, rewrite=rewrite_native_group_norm),
    OpRule((nn.PReLU,), prelu_module, rewrite=None, resize=resize_prelu),
    OpRule((F.prelu, torch.prelu, aten.prelu, aten._prelu_kernel), prelu_function, rewrite=None),
)))
