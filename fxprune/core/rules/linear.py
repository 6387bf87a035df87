"""Linear layers and matrix products.

``linear(x, W[out, in])``: W's rows produce the output features, x's last dim is contracted against W's
columns. ``a @ b`` ties a's last dim to b's second-to-last (the contraction: verify masks a's dropped
positions), keeps a's rows and b's columns, and broadcasts batch dims. A matrix product with a loose
parameter (``x @ self.weight``) makes that parameter's free dim a producer. ``einsum`` generalises
both: every letter is one channel space, tied across the operands that use it; a letter missing from the
output is contracted (verify masks the first operand that carries it; export passes the operands as a
list, so the mask goes before the permute that feeds one of them, or the letter freezes).
"""
from __future__ import annotations

import operator
from typing import Any, Optional

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from fxprune.core.opcall import ActSink, OpCall, Unsupported
from fxprune.core.registry import OpFamily, OpRule, register

aten = torch.ops.aten


def linear(op: OpCall, x: Any, w_key: Optional[str], b_key: Optional[str]) -> Any:
    if w_key is None:
        raise Unsupported("a linear whose weight is computed in the graph")
    w = op.param(w_key)
    out_ids = op.produce(w_key, 0)
    x_ids = op.ids(x)
    op.unify(x_ids[-1], w[1])
    op.consume_param(w_key, 1)
    op.weighted_consumer(w_key, 1, b_key, x, len(x_ids) - 1)
    if b_key is not None:
        op.unify(op.param(b_key)[0], out_ids)
    return tuple(x_ids[:-1]) + (out_ids,)


def linear_module(op: OpCall) -> Any:
    bias = f"{op.node.target}.bias" if op.module.bias is not None else None
    return linear(op, op.arg(0, "input"), f"{op.node.target}.weight", bias)


def linear_function(op: OpCall) -> Any:
    # linear(input, weight, bias)
    bias = op.arg(2, "bias")
    out = linear(op, op.arg(0, "input"), op.param_key(op.arg(1, "weight")), op.param_key(bias))
    if isinstance(bias, fx.Node) and op.param_key(bias) is None:
        # a bias computed in the graph (BEiT's cat(q_bias, k_bias, v_bias)): its entries are the rows'
        op.unify(op.ids(bias)[-1], out[-1])
    return out


def matmul(op: OpCall) -> Any:
    # a[..., n, k] @ b[..., k, m] -> [..., n, m]
    a, b = op.arg(0, "input"), op.arg(1, "other")
    a_ids, b_ids = op.ids(a), op.ids(b)
    if len(a_ids) < 2 or len(b_ids) < 2:
        raise Unsupported("a matrix-vector product")
    produce_loose(op, b, len(b_ids) - 1)
    produce_loose(op, a, len(a_ids) - 2)  # w[expert_ids] @ x: stacked experts' rows (rules.moe)
    op.unify(a_ids[-1], b_ids[-2], f"contracted against a fixed dim at {op.where()}")
    op.consume_act(0, len(a_ids) - 1, a_ids[-1])
    batch = _batch_dims(op, a, b, a_ids, b_ids)
    return batch + (a_ids[-2], b_ids[-1])


SEE_THROUGH = (aten.t, aten.numpy_T, aten.transpose, aten.permute, aten.alias, aten.detach, aten.to,
               aten._to_copy, aten.index, aten.index_select, "t", "transpose", "permute", "to", "detach",
               "index_select", torch.t, torch.transpose, torch.permute, torch.index_select, operator.getitem)
"""Ops through which a parameter is still "loose": they move, cast or gather its slices without mixing
them (``self.weight.T``, Falcon's ``x @ self.weight.T``; ``w[expert_ids]``, stacked experts)."""


def produce_loose(op: OpCall, value: Any, dim: int) -> None:
    """``x @ self.weight`` (or ``self.weight.T``, ``w[expert_ids]``): the parameter dim that is ``value``'s
    dim ``dim`` creates channels. Found by following ``SEE_THROUGH`` ops back to the parameter, then by
    identity of the id array (those ops hand on the parameter's own arrays)."""
    ids = op.ids(value)
    ids = ids[dim] if isinstance(ids, tuple) and -len(ids) <= dim < len(ids) else None
    node = value
    while ids is not None and isinstance(node, fx.Node):
        key = op.param_key(node)
        if key is not None:
            dims = [d for d, a in enumerate(op.param(key)) if a is ids]
            if len(dims) == 1:
                op.produce(key, dims[0])
            return
        if getattr(node.target, "overloadpacket", node.target) not in SEE_THROUGH or not node.args:
            return
        node = node.args[0]


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


def _einsum_operands(op: OpCall) -> tuple[str, list, Optional[int]]:
    """The equation, the operands and the node-args index of the first one (None: a list argument)."""
    equation = op.value(op.arg(0, "equation"))
    rest = list(op.node.args[1:])
    if len(rest) == 1 and isinstance(rest[0], (list, tuple)):  # aten.einsum(eq, [a, b])
        return equation, list(rest[0]), None
    return equation, rest, 1


def _einsum_terms(equation: str, ndims: list[int]) -> tuple[list[str], str]:
    """``"b h i d, b h j d -> b h i j"`` -> (["bhid", "bhjd"], "bhij"); implicit output as torch does."""
    equation = equation.replace(" ", "")
    if "..." in equation:
        raise Unsupported("einsum with an ellipsis")
    lhs, arrow, out = equation.partition("->")
    terms = lhs.split(",")
    if not arrow:
        letters = "".join(terms)
        out = "".join(sorted(c for c in set(letters) if letters.count(c) == 1))
    if len(terms) != len(ndims) or any(len(t) != n or len(set(t)) != n for t, n in zip(terms, ndims)):
        raise Unsupported(f"einsum {equation!r} with repeated letters in one operand")
    return terms, out


def einsum(op: OpCall) -> Any:
    # einsum("bhid,bhjd->bhij", q, k): each letter is one channel space; letters left out are contracted
    equation, operands, first = _einsum_operands(op)
    terms, out = _einsum_terms(equation, [len(op.shape(x)) for x in operands])
    letters: dict[str, Optional[torch.Tensor]] = {}
    for letter in dict.fromkeys("".join(terms)):
        uses = [(i, t.index(letter)) for i, t in enumerate(terms) if letter in t]
        letters[letter] = _einsum_letter(op, operands, uses)
        if letter not in out and letters[letter] is not None:
            _einsum_contract(op, operands, first, uses, letters[letter])
    return tuple(letters[c] for c in out)


def _einsum_contract(op: OpCall, operands: list, first: Optional[int], uses: list,
                     ids: torch.Tensor) -> None:
    # a contracted letter: verify masks the first operand that carries it
    if first is not None:
        i, d = uses[0]
        op.consume_act(first + i, d, ids)
        return
    # aten.einsum(eq, [a, b]): verify masks node args, not list items, so mask the operand where a
    # pure relayout (export's permute before the einsum) reads it
    if not any(_mask_before_relayout(op, operands[i], d) for i, d in uses):
        op.freeze(ids, "an einsum contraction over operands passed as a list")


RELAYOUTS = ("permute", "transpose", "contiguous", "clone", torch.permute, torch.transpose, torch.clone,
             aten.permute, aten.transpose, aten.contiguous, aten.clone)


def _mask_before_relayout(op: OpCall, operand: Any, dim: int) -> bool:
    """Record the mask on ``relayout(x) -> operand`` (its only use): masking x's matching dim zeroes
    the same positions, since a relayout moves channels (the same id arrays) without mixing them."""
    if not isinstance(operand, fx.Node) or len(operand.users) != 1 or \
            getattr(operand.target, "overloadpacket", operand.target) not in RELAYOUTS:
        return False
    ids = op.ids(operand)[dim]
    source = op.ids(operand.args[0]) if isinstance(operand.args[0], fx.Node) else None
    matches = [k for k, s in enumerate(source or ()) if s is ids]
    if len(matches) != 1:
        return False
    op.ctx.act_sinks.append(ActSink(operand.name, 0, matches[0], ids))
    return True


def _einsum_letter(op: OpCall, operands: list, uses: list) -> Optional[torch.Tensor]:
    """Tie every full-size use of a letter; a size-1 (broadcast) use freezes its single channel."""
    size = max(op.shape(operands[i])[d] for i, d in uses)
    arrays, fixed = [], False
    for i, d in uses:
        ids = op.ids(operands[i])[d]
        if op.shape(operands[i])[d] != size:
            op.freeze(ids, "a channel broadcast in an einsum")
        elif ids is None:
            fixed = True
        else:
            arrays.append(ids)
    if fixed:
        op.freeze(arrays, "an einsum letter over a fixed dim")
        return None
    for other in arrays[1:]:
        op.unify(arrays[0], other)
    return arrays[0] if arrays else None


def resize_linear(old: nn.Module, new: nn.Module, rw) -> None:
    new.out_features, new.in_features = new.weight.shape


def addmm(op: OpCall) -> Any:
    # addmm(bias, a[n, k], b[k, m]) = bias + a @ b (HuggingFace's Conv1D, decomposed linears)
    a, b = op.arg(1, "mat1"), op.arg(2, "mat2")
    a_ids, b_ids = op.ids(a), op.ids(b)
    produce_loose(op, b, len(b_ids) - 1)
    op.unify(a_ids[-1], b_ids[-2], f"contracted against a fixed dim at {op.where()}")
    op.consume_act(1, 1, a_ids[-1])
    out = (a_ids[0], b_ids[1])
    bias = op.ids(op.arg(0, "input"))
    if bias is not None:
        for k in range(1, len(bias) + 1):
            if op.shape(op.arg(0, "input"))[-k] == op.shape(op.node)[-k]:
                op.unify(bias[-k], out[-k])
            else:
                op.freeze(bias[-k], "a channel broadcast across a channel dim")
    return out


FAMILY = register(OpFamily("linear", (
    OpRule((nn.Linear,), linear_module, rewrite=None, resize=resize_linear),
    # linear(input, weight, bias)
    OpRule((F.linear, aten.linear), linear_function, rewrite=None),
    # a[..., n, k] @ b[..., k, m] -> [..., n, m]
    OpRule((operator.matmul, torch.matmul, torch.mm, torch.bmm, "matmul", "mm", "bmm", "__matmul__",
           aten.matmul, aten.mm, aten.bmm), matmul, rewrite=None),
    # einsum("bhid,bhjd->bhij", q, k): each letter is one channel space; letters left out are contracted
    OpRule((torch.einsum, aten.einsum), einsum, rewrite=None),
    # addmm(bias, a[n, k], b[k, m]) = bias + a @ b (HuggingFace's Conv1D, decomposed linears)
    OpRule((torch.addmm, "addmm", aten.addmm), addmm, rewrite=None),
)))
