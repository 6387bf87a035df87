"""Mixture-of-experts layers: routed experts stored as 3-D parameters, one slice per expert.

transformers 5.x stacks a layer's experts: ``gate_up_proj[E, 2I, H]`` and ``down_proj[E, H, I]``
(Mixtral, Qwen2-MoE, ...). It runs them in one of two ways, both handled here or by the matmul rule:

- ``grouped_mm`` (the default): tokens sorted by expert, then ``grouped_mm(x[S, H], w[E, H, N], offs)``
  where ``offs`` holds where each expert's rows end (``aten._grouped_mm`` on GPUs; transformers' own
  ``grouped_mm_fallback`` op elsewhere and under ``torch.export``). Row s of ``x`` is multiplied by the
  expert its offset range names, so ``x``'s columns are contracted against ``w``'s dim 1 and ``w``'s dim
  2 opens the output's channels — a linear layer per expert.
- ``batched_mm``: the experts gathered per token, ``w[expert_ids] @ x[..., None]`` — an ordinary batched
  matmul whose first operand is a parameter seen through a gather: ``fxprune.core.rules.linear`` makes its
  rows a producer.

**Units.** Analysis keeps one id array per tensor dim, so intermediate index ``i`` is one unit across
*all* experts of a layer: gate row ``i``, up row ``I + i`` and down column ``i`` of every expert drop
together, and every expert keeps the same indices. That is what a stacked 3-D tensor can hold without
padding, what a plan (``{key: {dim: kept indices}}``) can say, and what an HF config can write (one
``moe_intermediate_size`` / ``intermediate_size`` for every expert, the same count in every layer under
the HF policy). Scores sum each unit's slices over the experts. Per-expert index sets at a common count
would need a gather per expert in the plan; they are not offered. The experts dim itself stays: routing
reads it (the router's softmax and top-k, ``histc`` bins, ``one_hot`` classes), so it freezes here with
that reason, and whole experts are not pruned.

``repeat_interleave(x, k, dim)`` (each token copied once per chosen expert) and ``index_add(x, dim, index,
y)`` (each token's expert outputs summed back into its row) move positions along a dim that carries no
channel; their other dims pass (tied between ``x`` and ``y``), channels on ``dim`` freeze.
"""
from __future__ import annotations

import sys
from typing import Any

import torch
import torch.nn.functional as F

from fxprune.core.opcall import OpCall, Unsupported
from fxprune.core.registry import OpFamily, OpRule, register, register_late
from fxprune.core.rules.linear import produce_loose

aten = torch.ops.aten

_TRANSFORMERS_OP = "transformers.integrations.moe"  # defines torch.ops.transformers.grouped_mm_fallback
_registered_transformers = False


def grouped_mm(op: OpCall) -> Any:
    # grouped_mm(x[S, K], w[E, K, N], offs[E]) -> [S, N]: each row of x times its expert's w
    x, w = _arg(op, 0, "input", "self"), _arg(op, 1, "weight", "mat2")
    x_ids, w_ids = op.ids(x), op.ids(w)
    if len(x_ids) != 2 or len(w_ids) != 3:
        raise Unsupported(f"a grouped matmul of {len(x_ids)}-D by {len(w_ids)}-D operands (only 2-D by 3-D "
                          f"experts is understood)")
    op.freeze(w_ids[0], "an expert of a grouped matmul (tokens reach it by routing offsets)")
    op.freeze(op.ids(op.arg(2, "offs")), "routing offsets of a grouped matmul")
    op.unify(x_ids[1], w_ids[1], f"contracted against a fixed dim at {op.where()}")
    op.consume_act(0, 1, x_ids[1])
    produce_loose(op, w, 2)
    out = (x_ids[0], w_ids[2])
    bias = op.ids(op.arg(3, "bias"))
    if bias is not None:  # bias[E, N]: one row per expert
        op.freeze(bias[0], "an expert of a grouped matmul's bias")
        op.unify(bias[1], out[1])
    return out


def _arg(op: OpCall, index: int, *names: str) -> Any:
    """An argument that the ATen op and transformers' op name differently."""
    return next((v for v in (op.arg(index, n) for n in names) if v is not None), None)


@register_late
def register_transformers() -> None:
    """Add transformers' ``grouped_mm_fallback`` op to the rule table once transformers defines it."""
    global _registered_transformers
    if _registered_transformers or _TRANSFORMERS_OP not in sys.modules:
        return
    packet = getattr(getattr(torch.ops, "transformers", None), "grouped_mm_fallback", None)
    if packet is not None:
        register(OpFamily("moe-transformers", (OpRule((packet,), grouped_mm, rewrite=None),)))
        _registered_transformers = True


def repeat_interleave(op: OpCall) -> Any:
    # repeat_interleave(x, k, dim): each position along dim repeated k times; other dims pass
    x = op.arg(0, "input")
    repeats, dim = op.arg(1, "repeats"), op.value(op.arg(2, "dim"))
    if not isinstance(x, torch.fx.Node) or not isinstance(op.value(repeats), int) or dim is None:
        raise Unsupported("repeat_interleave of a flattened tensor or with per-position repeats")
    x_ids = list(op.ids(x))
    dim %= len(x_ids)
    op.freeze(x_ids[dim], "channels repeated in place (repeat_interleave)")
    x_ids[dim] = None
    return tuple(x_ids)


def index_add(op: OpCall) -> Any:
    # index_add(x, dim, index, y): y's rows added into x's rows at index; other dims are x's = y's
    x, y = op.arg(0, "input"), op.arg(3, "source")
    x_ids, y_ids = list(op.ids(x)), list(op.ids(y))
    dim = op.value(op.arg(1, "dim")) % len(x_ids)
    op.freeze([x_ids[dim], y_ids[dim]], "channels scattered by index (index_add)")
    for d in range(len(x_ids)):
        if d != dim:
            op.unify(x_ids[d], y_ids[d], f"index_add of a fixed dim at {op.where()}")
    x_ids[dim] = None
    return tuple(x_ids)


FAMILY = register(OpFamily("moe", (
    # grouped_mm(x[T, K], w[E, K, N], offs) -> [T, N]: each expert's rows of x times its own w
    OpRule((aten._grouped_mm, torch._grouped_mm, *((F.grouped_mm,) if hasattr(F, "grouped_mm") else ())),
           grouped_mm, rewrite=None),
    # repeat_interleave(x, k, dim): each position along dim repeated k times; other dims pass
    OpRule(("repeat_interleave", torch.repeat_interleave, aten.repeat_interleave), repeat_interleave,
           rewrite=None),
    # index_add(x, dim, index, y): y's rows added into x's rows at index; other dims are x's = y's
    OpRule(("index_add", torch.index_add, aten.index_add), index_add, rewrite=None),
)))
