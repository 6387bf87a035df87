"""Convolutions, 1d to 3d, plain, grouped, depthwise and transposed.

``conv(x, W[out, in/g, *k])``: the output channels are W's rows (the producer), the input channels are
contracted against W's columns (a consumer: verify zeroes dropped columns). A grouped conv is pruned by
whole groups — every input and output channel of group i form one unit — so the group width never
changes and only ``groups`` shrinks; a depthwise conv is the case of one channel per group.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from fxprune.core.opcall import OpCall, Unsupported
from fxprune.core.registry import OpFamily, OpRule, register

aten = torch.ops.aten

CONV_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
TRANSPOSED_MODULES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
# (weight position, bias position, groups position) of each functional spelling
CONV_FUNCTIONS = (F.conv1d, F.conv2d, F.conv3d, aten.conv1d, aten.conv2d, aten.conv3d)
TRANSPOSED_FUNCTIONS = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d,
                        aten.conv_transpose1d, aten.conv_transpose2d, aten.conv_transpose3d)


def conv(op: OpCall, x: Any, w_key: Optional[str], b_key: Optional[str], groups: int,
         transposed: bool) -> Any:
    """The conv family, whatever its spelling."""
    if w_key is None:
        raise Unsupported("a conv whose weight is computed in the graph")
    x_ids, w = op.ids(x), op.param(w_key)
    c = _channel_dim(len(op.shape(x)), len(w))
    in_dim, out_dim = (0, 1) if transposed else (1, 0)
    if transposed and groups != 1:
        raise Unsupported("a grouped transposed conv")
    out_ids = op.produce(w_key, out_dim)
    if groups == 1:
        op.unify(x_ids[c], w[in_dim])
        op.consume_param(w_key, in_dim)
        op.weighted_consumer(w_key, in_dim, b_key, x, c, exact=not _padded(op))
    else:
        _tie_groups(op, x_ids[c], out_ids, groups)
    if b_key is not None:
        op.unify(op.param(b_key)[0], out_ids)
    return tuple(out_ids if d == c else _other_dim(op, x, x_ids, w, c, d) for d in range(len(op.shape(op.node))))


def _other_dim(op: OpCall, x: Any, x_ids: tuple, w: tuple, c: int, d: int) -> Optional[torch.Tensor]:
    """A batch or spatial dim that carries channels (CoaT stacks class tokens and convolves across
    them: its Conv1d's length is the channels): they pass where each output position reads the same
    input position alone (the batch; a kernel of 1 that keeps the size), and freeze elsewhere."""
    ids = x_ids[d]
    if ids is None:
        return None
    kernel = 1 if d < c else w[1 + d - c].numel()  # the weight's kernel size along this dim
    if kernel == 1 and op.shape(x)[d] == op.shape(op.node)[d]:
        return ids
    op.freeze(ids, "channels on a conv's spatial dim")
    return None


def _channel_dim(ndim: int, weight_ndim: int) -> int:
    """The channel dim of a conv's input or output: 1 batched, 0 unbatched (the rest are kernel dims)."""
    return ndim - (weight_ndim - 2) - 1


def _padded(op: OpCall) -> bool:
    """Whether the conv pads its input (a dropped channel's constant then misses the border)."""
    padding = op.module.padding if op.module is not None else op.value(op.arg(4, "padding", 0))
    if isinstance(padding, str):
        return padding != "valid"
    return any(p != 0 for p in (padding if isinstance(padding, (list, tuple)) else [padding]))


def _tie_groups(op: OpCall, x_ids: Any, out_ids: torch.Tensor, groups: int) -> None:
    # conv with groups=g -> every channel of group i, in and out, is one unit
    unit = out_ids.view(groups, -1)[:, 0]
    op.unify(out_ids, unit.repeat_interleave(out_ids.numel() // groups))
    if x_ids is None:
        op.freeze(out_ids, "a grouped conv over channels that cannot be pruned")
        return
    op.unify(x_ids, unit.repeat_interleave(x_ids.numel() // groups))


def conv_module(op: OpCall) -> Any:
    m = op.module
    bias = f"{op.node.target}.bias" if m.bias is not None else None
    return conv(op, op.arg(0, "input"), f"{op.node.target}.weight", bias, m.groups, False)


def conv_transpose_module(op: OpCall) -> Any:
    m = op.module
    if len(op.node.args) > 1 or op.node.kwargs.get("output_size") is not None:
        raise Unsupported("ConvTranspose called with output_size")
    bias = f"{op.node.target}.bias" if m.bias is not None else None
    return conv(op, op.arg(0, "input"), f"{op.node.target}.weight", bias, m.groups, True)


def conv_function(op: OpCall) -> Any:
    # conv2d(input, weight, bias, stride, padding, dilation, groups)
    return conv(op, op.arg(0, "input"), op.param_key(op.arg(1, "weight")),
                op.param_key(op.arg(2, "bias")), op.value(op.arg(6, "groups", 1)), False)


def conv_transpose_function(op: OpCall) -> Any:
    # conv_transpose2d(input, weight, bias, stride, padding, output_padding, groups, dilation)
    return conv(op, op.arg(0, "input"), op.param_key(op.arg(1, "weight")),
                op.param_key(op.arg(2, "bias")), op.value(op.arg(6, "groups", 1)), True)


def convolution(op: OpCall) -> Any:
    # convolution(input, weight, bias, stride, padding, dilation, transposed, output_padding, groups)
    return conv(op, op.arg(0, "input"), op.param_key(op.arg(1, "weight")),
                op.param_key(op.arg(2, "bias")), op.value(op.arg(8, "groups", 1)),
                bool(op.value(op.arg(6, "transposed"))))


def pruned_groups(groups: int, old_channels: int, new_channels: int) -> int:
    """The group count after pruning: whole groups go, so the group width stays and the count shrinks
    with the output channels. The one formula both levels use (module resize and graph rewrite)."""
    return groups if groups == 1 else new_channels // (old_channels // groups)


def _groups_at(position: int):
    """The rewrite of a functional conv whose ``groups`` literal is argument ``position``."""

    def rewrite_groups(rw) -> None:
        groups = rw.arg(position, "groups", 1)
        if groups != 1:
            c = _channel_dim(len(rw.old_shape()), len(rw.old_input_shape(1)))
            rw.set_arg(position, "groups", pruned_groups(groups, rw.old_shape()[c], rw.new_shape()[c]))

    return rewrite_groups


rewrite_conv_function = _groups_at(6)  # conv2d(input, weight, bias, stride, padding, dilation, groups)
rewrite_convolution = _groups_at(8)  # convolution(input, ..., transposed, output_padding, groups)


def resize_conv(old: nn.Module, new: nn.Module, rw) -> None:
    new.out_channels = new.weight.shape[0]
    new.groups = pruned_groups(old.groups, old.out_channels, new.out_channels)
    new.in_channels = new.weight.shape[1] * new.groups


def resize_conv_transpose(old: nn.Module, new: nn.Module, rw) -> None:
    new.in_channels = new.weight.shape[0]
    new.out_channels = new.weight.shape[1] * new.groups


FAMILY = register(OpFamily("conv", (
    # conv(x) -> y: W's rows produce the channels, its columns consume x's; groups couple in and out
    OpRule(CONV_MODULES, conv_module, rewrite=None, resize=resize_conv),
    OpRule(TRANSPOSED_MODULES, conv_transpose_module, rewrite=None, resize=resize_conv_transpose),
    OpRule(CONV_FUNCTIONS, conv_function, rewrite=rewrite_conv_function),
    OpRule(TRANSPOSED_FUNCTIONS, conv_transpose_function, rewrite=rewrite_conv_function),
    OpRule((aten.convolution, aten._convolution), convolution, rewrite=rewrite_convolution),
)))
