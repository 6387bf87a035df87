"""Embeddings: the embedding dim is a producer; token indices carry no channel."""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from fxprune.core.opcall import OpCall, Unsupported
from fxprune.core.registry import OpFamily, OpRule, register

aten = torch.ops.aten


def embedding(op: OpCall, indices: Any, w_key: Optional[str]) -> Any:
    # embedding(idx, W[num, dim]) -> [..., dim]: W's columns create the channels
    if w_key is None:
        raise Unsupported("an embedding whose table is computed in the graph")
    out_ids = op.produce(w_key, 1)
    n = len(op.shape(op.node))
    return tuple(out_ids if d == n - 1 else None for d in range(n))


def embedding_module(op: OpCall) -> Any:
    return embedding(op, op.arg(0, "input"), f"{op.node.target}.weight")


def embedding_function(op: OpCall) -> Any:
    # F.embedding(input, weight); aten.embedding(weight, indices)
    is_aten = isinstance(op.node.target, torch._ops.OpOverload)
    weight = op.arg(0, "weight") if is_aten else op.arg(1, "weight")
    return embedding(op, None, op.param_key(weight))


def embedding_bag_function(op: OpCall) -> Any:
    is_aten = isinstance(op.node.target, torch._ops.OpOverload)
    weight = op.arg(0, "weight") if is_aten else op.arg(1, "weight")
    key = op.param_key(weight)
    if key is None:
        raise Unsupported("an embedding bag whose table is computed in the graph")
    out_ids = op.produce(key, 1)
    if isinstance(op.out, (tuple, list)):  # aten returns (out, offset2bag, bag_size, max_indices)
        return ((None, out_ids),) + tuple(op.fixed(v) for v in op.out[1:])
    return (None, out_ids)


def resize_embedding(old: nn.Module, new: nn.Module, rw) -> None:
    new.embedding_dim = new.weight.shape[1]


FAMILY = register(OpFamily("embedding", (
    OpRule((nn.Embedding, nn.EmbeddingBag), embedding_module, rewrite=None, resize=resize_embedding),
    # F.embedding(input, weight); aten.embedding(weight, indices)
    OpRule((F.embedding, aten.embedding), embedding_function, rewrite=None),
    OpRule((F.embedding_bag, aten._embedding_bag, aten.embedding_bag), embedding_bag_function, rewrite=None),
)))
