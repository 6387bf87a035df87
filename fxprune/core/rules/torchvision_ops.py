"""torchvision functions that ``torch.fx.wrap`` keeps whole in an fx graph: Swin's attention and friends
(the image Swin v1/v2 and the video Swin3d).

At the fx level ``symbolic_trace`` does not look inside a wrapped function, so each is one
``call_function`` node and needs its own rule; at the export level they decompose into ATen ops that the
other families handle (view, permute, linear, matmul, softmax, roll, pad...).

``shifted_window_attention(x[..., C], qkv_weight[3C, C], proj_weight[C, C], bias[1, h, N, N], window,
num_heads, ...)`` splits C into ``num_heads`` heads of ``d = C // num_heads`` and scales q by ``d ** -0.5``
(Swin v1) or normalises q and k over d (Swin v2). Pruning head dims would change that scale or those
norms, so it is pruned by **whole heads**, like ``nn.MultiheadAttention``: head i owns rows
``p*C + i*d + j`` of ``qkv_weight`` (p = q, k, v), rows and columns ``i*d + j`` of ``proj_weight``, column i
of the relative position bias (table or MLP output) and row i of Swin v2's ``logit_scale``. The function
reads its width from x and reshapes its output back to it, so x's channels and the output's are tied to
the heads index by index too; the rewriter passes the new head count. Exact.
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from fxprune.core.opcall import OpCall, Unsupported
from fxprune.core.registry import OpFamily, OpRule, register


def _swin_functions() -> tuple[tuple, tuple, tuple, tuple]:
    """(attention, relative position bias, patch merging, attention taking a logit_scale): Swin v1/v2
    and the video Swin3d, whose 3-D window attention takes the same arguments but no logit_scale."""
    try:
        from torchvision.models import swin_transformer as swin
        from torchvision.models.video import swin_transformer as swin3d
    except ImportError:  # torchvision is optional
        return (), (), (), ()
    return ((swin.shifted_window_attention, swin3d.shifted_window_attention_3d),
            (swin._get_relative_position_bias, swin3d._get_relative_position_bias),
            (swin._patch_merging_pad,), (swin.shifted_window_attention,))


def _drop_block_functions() -> tuple:
    try:
        from torchvision.ops import drop_block2d, drop_block3d
    except ImportError:
        return ()
    return (drop_block2d, drop_block3d)


SWIN_ATTENTION, SWIN_BIAS, SWIN_MERGE, WITH_LOGIT_SCALE = _swin_functions()


def shifted_window_attention(op: OpCall) -> Any:
    # swin attention(x[..., h*d]) -> [..., h*d]: head i = qkv rows p*C+i*d+j, proj rows/cols i*d+j
    x = op.arg(0, "input")
    num_heads = int(op.value(op.arg(5, "num_heads")))
    width = op.shape(x)[-1]
    if width % num_heads:
        raise Unsupported(f"a width {width} that {num_heads} heads do not divide")
    heads = op.table.fresh(num_heads)
    positions = heads.repeat_interleave(width // num_heads)
    x_ids = op.ids(x)
    op.unify(x_ids[-1], positions, f"window attention over fixed features at {op.where()}")
    op.freeze(list(x_ids[:-1]), "window attention mixes spatial positions")
    _tie_weights(op, positions)
    _tie_per_head(op, heads)
    return (None,) * (len(x_ids) - 1) + (positions,)


def _key(op: OpCall, index: int, name: str) -> Optional[str]:
    value = op.arg(index, name)
    if value is None:
        return None
    key = op.param_key(value)
    if key is None:
        raise Unsupported(f"window attention whose {name} is computed in the graph")
    return key


def _tie_weights(op: OpCall, positions: torch.Tensor) -> None:
    packed = positions.repeat(3)
    qkv_w, proj_w = _key(op, 1, "qkv_weight"), _key(op, 2, "proj_weight")
    op.unify(op.produce(qkv_w, 0), packed)
    op.unify(op.param(qkv_w)[1], positions)
    op.consume_param(qkv_w, 1)
    op.unify(op.produce(proj_w, 0), positions)
    op.unify(op.param(proj_w)[1], positions)
    op.consume_param(proj_w, 1)
    for index, name, ids in ((9, "qkv_bias", packed), (10, "proj_bias", positions)):
        key = _key(op, index, name)
        if key is not None:
            op.unify(op.param(key)[0], ids)


def _tie_per_head(op: OpCall, heads: torch.Tensor) -> None:
    """The relative position bias [1, h, N, N] and Swin v2's logit_scale [h, 1, 1] are per head."""
    bias_ids = op.ids(op.arg(3, "relative_position_bias"))
    if bias_ids is not None:
        op.freeze([bias_ids[d] for d in range(len(bias_ids)) if d != len(bias_ids) - 3],
                  "a relative position bias over token pairs")
        op.unify(bias_ids[-3], heads, f"a relative position bias without heads at {op.where()}")
    key = _key(op, 11, "logit_scale") if op.node.target in WITH_LOGIT_SCALE else None
    if key is not None:
        op.unify(op.param(key)[0], heads)


def rewrite_shifted_window_attention(rw) -> None:
    old, new = rw.old_input_shape(0)[-1], rw.new_input_shape(0)[-1]
    heads = rw.arg(5, "num_heads")
    rw.set_arg(5, "num_heads", new // (old // heads))


def relative_position_bias(op: OpCall) -> Any:
    # bias(table[T, h], index, window) -> [1, h, N, N]: the table's columns are the heads
    table_ids = op.ids(op.arg(0, "relative_position_bias_table"))
    op.freeze(table_ids[0], "a relative position table gathered by index")
    return (None, table_ids[1], None, None)


def patch_merging_pad(op: OpCall) -> Any:
    # merge(x[..., H, W, C]) -> [..., H/2, W/2, 4C]: the four 2x2 neighbours concatenated on channels
    x_ids = op.ids(op.arg(0, "x"))
    op.freeze(list(x_ids[:-1]), "patch merging mixes spatial positions")
    channels = x_ids[-1].repeat(4) if x_ids[-1] is not None else None
    return (None,) * (len(x_ids) - 1) + (channels,)


def drop_block(op: OpCall) -> Any:
    # drop_block2d(x, p, block_size): zeroes spatial blocks per sample and channel; channels pass
    return op.ids(op.arg(0, "input"))


__all__ = ["shifted_window_attention", "relative_position_bias", "patch_merging_pad", "drop_block"]


FAMILY = register(OpFamily("torchvision_ops", (
    # swin attention(x[..., h*d]) -> [..., h*d]: head i = qkv rows p*C+i*d+j, proj rows/cols i*d+j
    OpRule(SWIN_ATTENTION, shifted_window_attention, rewrite=rewrite_shifted_window_attention),
    # bias(table[T, h], index, window) -> [1, h, N, N]: the table's columns are the heads
    OpRule(SWIN_BIAS, relative_position_bias, rewrite=None),
    # merge(x[..., H, W, C]) -> [..., H/2, W/2, 4C]: the four 2x2 neighbours concatenated on channels
    OpRule(SWIN_MERGE, patch_merging_pad, rewrite=None),
    # drop_block2d(x, p, block_size): zeroes spatial blocks per sample and channel; channels pass
    OpRule(_drop_block_functions(), drop_block, rewrite=None),
)))
