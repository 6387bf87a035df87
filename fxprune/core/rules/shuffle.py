"""Channel and pixel shuffles: fixed permutations of the channel dim with a block structure.

``channel_shuffle(x[..., g*n, H, W], g)``: output position ``i*g + j`` is input position ``j*n + i``.
Pruning keeps the op valid only if every group keeps the same local indices, so local index ``i`` of all
``g`` groups is one unit; then the pruned shuffle is exactly the shuffle of the kept channels.

``pixel_shuffle(x[..., C*r*r, H, W], r) -> [..., C, H*r, W*r]`` moves each block of ``r*r`` channels
into space: a block is one unit, the output channel. ``pixel_unshuffle`` is the inverse: each input
channel becomes a block of ``r*r`` output positions that share its id. The two spatial dims are mixed
with channels, so channels on them freeze. No literal changes: the ops read sizes from their input.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from fxprune.core.opcall import OpCall
from fxprune.core.registry import OpFamily, OpRule, register

aten = torch.ops.aten


def _factor(op: OpCall, name: str, index: int) -> int:
    if op.module is not None:
        return int(getattr(op.module, name))
    return int(op.value(op.arg(index, name)))


def _with_channels(op: OpCall, x_ids: tuple, channels: Any) -> tuple:
    """Leading dims pass, the channel dim (third from last) is ``channels``, H and W carry none."""
    op.freeze(list(x_ids[-2:]), "a pixel shuffle mixes this channel dim with space")
    return tuple(x_ids[:-3]) + (channels, None, None)


def channel_shuffle(op: OpCall) -> Any:
    # channel_shuffle(x, g): local index i of every group is one unit; positions are permuted
    x_ids = op.ids(op.arg(0, "input"))
    groups = _factor(op, "groups", 1)
    c = 1 if len(x_ids) > 1 else 0
    channels = x_ids[c]
    if channels is None:
        return x_ids
    rows = channels.view(groups, -1)
    op.unify(channels, rows[0].repeat(groups), f"a channel shuffle at {op.where()}")
    return tuple(rows.t().reshape(-1) if d == c else ids for d, ids in enumerate(x_ids))


def pixel_shuffle(op: OpCall) -> Any:
    # pixel_shuffle(x[..., C*r*r, H, W], r): each block of r*r channels is one output channel
    x_ids = op.ids(op.arg(0, "input"))
    block = _factor(op, "upscale_factor", 1) ** 2
    channels = x_ids[-3]
    if channels is None:
        return _with_channels(op, x_ids, None)
    unit = channels.view(-1, block)[:, 0]
    op.unify(channels, unit.repeat_interleave(block), f"a pixel shuffle at {op.where()}")
    return _with_channels(op, x_ids, unit)


def pixel_unshuffle(op: OpCall) -> Any:
    # pixel_unshuffle(x[..., C, H*r, W*r], r): channel c becomes r*r positions that share its id
    x_ids = op.ids(op.arg(0, "input"))
    block = _factor(op, "downscale_factor", 1) ** 2
    channels = x_ids[-3]
    return _with_channels(op, x_ids, None if channels is None else channels.repeat_interleave(block))


FAMILY = register(OpFamily("shuffle", (
    # channel_shuffle(x, g): local index i of every group is one unit; positions are permuted
    OpRule((nn.ChannelShuffle, F.channel_shuffle, torch.channel_shuffle, aten.channel_shuffle,
           aten.native_channel_shuffle), channel_shuffle, rewrite=None),
    # pixel_shuffle(x[..., C*r*r, H, W], r): each block of r*r channels is one output channel
    OpRule((nn.PixelShuffle, F.pixel_shuffle, torch.pixel_shuffle, aten.pixel_shuffle), pixel_shuffle,
           rewrite=None),
    # pixel_unshuffle(x[..., C, H*r, W*r], r): channel c becomes r*r positions that share its id
    OpRule((nn.PixelUnshuffle, F.pixel_unshuffle, torch.pixel_unshuffle, aten.pixel_unshuffle),
           pixel_unshuffle, rewrite=None),
)))
