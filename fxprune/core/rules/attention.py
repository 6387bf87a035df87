"""Attention: ``nn.MultiheadAttention`` (fx level) and ``scaled_dot_product_attention`` (both levels).

``nn.MultiheadAttention`` is pruned by **whole heads**. Head i owns rows ``p*E + i*d + j`` of the packed
``in_proj`` (p = q, k, v; d = head_dim) and columns ``i*d + j`` of ``out_proj``. The module uses one
``embed_dim`` for its inputs, its heads and its output, and requires ``embed_dim == num_heads *
head_dim``; so once heads go, the input and output widths must shrink by the same amount. The only way to
keep those sizes consistent is to tie them index by index: residual position ``i*d + j`` (the input's last
dim, ``in_proj`` columns, ``out_proj`` rows) belongs to head i too. Pruning is exact at the module (a
dropped head's output columns are zeroed; kept heads never read a dropped input position), and the
head count, ``embed_dim``, ``kdim`` and ``vdim`` are rewritten. Averaged attention weights change when a
head goes: if that output is used, the heads freeze; per-head weights carry the heads on dim 1.
At the export level the module is decomposed into linear/view/sdpa ops and handled by those rules.

``scaled_dot_product_attention(q[..., L, E], k[..., S, E], v[..., S, Ev]) -> out[..., L, Ev]``
contracts q's and k's last dims (tied; verify masks q), maps v's last dim to the output and broadcasts
the batch and head dims. The default scale is ``1/sqrt(E)``: when E shrinks the rewriter passes the
original scale explicitly, so pruned head dims stay exact. Sequence positions of k and v are mixed by the
softmax and stay; an attention mask carries no channels.
"""
from __future__ import annotations

import math
import operator
from typing import Any, Optional

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from fxprune.core.opcall import OpCall, Unsupported
from fxprune.core.registry import OpFamily, OpRule, register

aten = torch.ops.aten


# --- nn.MultiheadAttention ---------------------------------------------------------------------
def multihead_attention(op: OpCall) -> Any:
    # mha(q, k, v) -> (out[..., E], weights): head i = in_proj rows p*E+i*d+j, out_proj cols i*d+j
    m = op.module
    if not m._qkv_same_embed_dim:
        raise Unsupported(f"nn.MultiheadAttention {op.node.target} with kdim/vdim != embed_dim")
    heads = op.table.fresh(m.num_heads)
    positions = heads.repeat_interleave(m.head_dim)
    _tie_projections(op, positions)
    for index, name in ((0, "query"), (1, "key"), (2, "value")):
        ids = op.ids(op.arg(index, name))
        op.unify(ids[-1], positions, f"attention over fixed features at {op.where()}")
        op.freeze(list(ids[:-1]), "attention mixes sequence positions")
    for index, name in ((3, "key_padding_mask"), (5, "attn_mask")):
        op.freeze(op.ids(op.arg(index, name)), "an attention mask")
    out, weights = op.out
    out_ids = (None,) * (out.dim() - 1) + (positions,)
    return out_ids, _weights_ids(op, weights, heads, positions)


def _tie_projections(op: OpCall, positions: torch.Tensor) -> None:
    prefix = op.node.target
    packed = positions.repeat(3)
    op.unify(op.produce(f"{prefix}.in_proj_weight", 0), packed)
    op.unify(op.param(f"{prefix}.in_proj_weight")[1], positions)
    op.consume_param(f"{prefix}.in_proj_weight", 1)
    op.unify(op.produce(f"{prefix}.out_proj.weight", 0), positions)
    op.unify(op.param(f"{prefix}.out_proj.weight")[1], positions)
    op.consume_param(f"{prefix}.out_proj.weight", 1)
    for name, ids in (("in_proj_bias", packed), ("out_proj.bias", positions), ("bias_k", positions),
                      ("bias_v", positions)):
        if _has(op.module, name):
            op.unify(op.param(f"{prefix}.{name}")[-1], ids)


def _has(module: nn.Module, name: str) -> bool:
    owner, _, attr = name.rpartition(".")
    return getattr(module.get_submodule(owner) if owner else module, attr, None) is not None


def _weights_ids(op: OpCall, weights: Any, heads: torch.Tensor, positions: torch.Tensor) -> Any:
    """Averaged weights change when a head goes; per-head weights [N, h, L, S] carry the heads."""
    if weights is None:
        return None
    if not op.arg(6, "average_attn_weights", True):
        return (None,) * (weights.dim() - 3) + (heads, None, None)
    if _output_used(op.node, 1):
        op.freeze(positions, "its averaged attention weights are used")
    return op.fixed(weights)


def _output_used(node: fx.Node, index: int) -> bool:
    """Whether element ``index`` of a tuple-valued node reaches any user."""
    for user in node.users:
        is_item = user.op == "call_function" and user.target is operator.getitem
        if not is_item or user.args[1] == index and user.users:
            return True
    return False


def resize_multihead_attention(old: nn.Module, new: nn.Module, rw) -> None:
    new.embed_dim = new.kdim = new.vdim = new.in_proj_weight.shape[1]
    new.num_heads = new.embed_dim // old.head_dim
    new.head_dim = old.head_dim


# --- scaled_dot_product_attention ----------------------------------------------------------------
SDPA = (F.scaled_dot_product_attention, aten.scaled_dot_product_attention)
SDPA_VARIANTS = (aten._scaled_dot_product_flash_attention_for_cpu, aten._scaled_dot_product_attention_math,
                 aten._scaled_dot_product_efficient_attention, aten._scaled_dot_product_flash_attention)


def scaled_dot_product_attention(op: OpCall) -> Any:
    # sdpa(q[..., L, E], k[..., S, E], v[..., S, Ev]) -> [..., L, Ev]: q·k contracted, v carried
    q, k, v = (op.arg(i, n) for i, n in ((0, "query"), (1, "key"), (2, "value")))
    q_ids, k_ids, v_ids = op.ids(q), op.ids(k), op.ids(v)
    op.unify(q_ids[-1], k_ids[-1], f"a query/key contraction over a fixed dim at {op.where()}")
    op.consume_act(0, len(q_ids) - 1, q_ids[-1])
    op.unify(k_ids[-2], v_ids[-2])
    op.freeze([k_ids[-2], v_ids[-2]], "the softmax mixes key positions")
    op.freeze([op.ids(a) for a in _extra_args(op)], "an attention mask or scale")
    out = op.out[0] if isinstance(op.out, (tuple, list)) else op.out
    batch = _batch_dims(op, [(q_ids, op.shape(q)), (k_ids, op.shape(k)), (v_ids, op.shape(v))],
                        tuple(out.shape[:-2]))
    out_ids = batch + (q_ids[-2], v_ids[-1])
    if not isinstance(op.out, (tuple, list)):
        return out_ids
    return (out_ids,) + tuple(_side_output(op, value, out_ids) for value in op.out[1:])


def _extra_args(op: OpCall) -> list:
    """Mask, bias and scale arguments (nodes only): none of them carries channels."""
    names = ("attn_mask", "attn_bias", "scale", "dropout_mask")
    return [a for a in list(op.node.args[3:]) + [op.node.kwargs.get(n) for n in names]
            if isinstance(a, fx.Node)]


def _batch_dims(op: OpCall, inputs: list, out_shape: tuple) -> tuple:
    """Batch and head dims broadcast across q, k and v (a grouped-query k/v head dim freezes)."""
    dims = []
    for d in range(len(out_shape)):
        sides = []
        for ids, shape in inputs:
            k = d - (len(out_shape) - (len(shape) - 2))
            if k < 0:
                continue
            if shape[k] == out_shape[d]:
                sides.append(ids[k])
            else:
                op.freeze(ids[k], "a head dim broadcast or grouped across attention inputs")
        dims.append(_tie(op, sides))
    return tuple(dims)


def _tie(op: OpCall, sides: list) -> Optional[torch.Tensor]:
    arrays = [s for s in sides if s is not None]
    if len(arrays) < len(sides):
        op.freeze(arrays, "attention inputs with and without channels on a batch dim")
        return None
    for other in arrays[1:]:
        op.unify(arrays[0], other)
    return arrays[0] if arrays else None


def _side_output(op: OpCall, value: Any, out_ids: tuple) -> Any:
    """logsumexp [..., L] keeps the output's leading dims; seeds and debug masks carry none."""
    if isinstance(value, torch.Tensor) and value.dim() == len(out_ids) - 1:
        return out_ids[:-1]
    op.freeze(list(out_ids[:-1]), "an attention side output")
    return op.fixed(value)


def rewrite_sdpa_scale(rw) -> None:
    """The default scale is 1/sqrt(E): keep the original one when E shrinks."""
    old_e, new_e = rw.old_input_shape(0)[-1], rw.new_input_shape(0)[-1]
    if old_e == new_e or _scale(rw.node) is not None:
        return
    scale = 1.0 / math.sqrt(old_e)
    if rw.node.target is F.scaled_dot_product_attention and len(rw.node.args) > 6:
        rw.set_arg(6, "scale", scale)
    else:
        rw.node.kwargs = {**rw.node.kwargs, "scale": scale}


def _scale(node: fx.Node) -> Any:
    if node.target is F.scaled_dot_product_attention and len(node.args) > 6:
        return node.args[6]
    return node.kwargs.get("scale")


__all__ = ["multihead_attention", "scaled_dot_product_attention"]


FAMILY = register(OpFamily("attention", (
    # mha(q, k, v) -> (out[..., E], weights): head i = in_proj rows p*E+i*d+j, out_proj cols i*d+j
    OpRule((nn.MultiheadAttention,), multihead_attention, rewrite=None, resize=resize_multihead_attention),
    # sdpa(q[..., L, E], k[..., S, E], v[..., S, Ev]) -> [..., L, Ev]: q·k contracted, v carried
    OpRule((*SDPA, *SDPA_VARIANTS), scaled_dot_product_attention, rewrite=rewrite_sdpa_scale),
)))
