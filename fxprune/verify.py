"""Verify: the pruned model must equal the original with every dropped channel contributing nothing.

The reference is built from the *original* graph, not the pruned one: every consumer that contracts over
channels gets its dropped inputs zeroed — parameter consumers (conv/linear input columns, RNN recurrent
columns) by zeroing those weight slices, activation contractions (``q @ k``, ``sum``) by a mask multiplied
into the graph. Both models run on the same inputs; groups marked approximate (LayerNorm statistics) are
reported, not failed.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from .analysis import Analysis, meta_value
from .errors import VerificationError
from .rewrite import Pruning, build_graph_module
from .predicates import is_quantizer


@dataclass(frozen=True)
class VerifyReport:
    """The outcome of :func:`verify`."""

    max_abs_error: float
    max_rel_error: float
    exact: bool
    """False when some dropped channel passes a channel-mixing op (approximate by nature)."""
    passed: bool
    tolerance: float

    def __str__(self) -> str:
        kind = "exact" if self.exact else "approximate"
        verdict = "passed" if self.passed else "FAILED"
        return f"verify {verdict}: max abs error {self.max_abs_error:.3g} ({kind}, tol {self.tolerance:g})"


def reference_model(analysis: Analysis, drop: torch.Tensor) -> fx.GraphModule:
    """The original graph with every dropped channel's consumer inputs zeroed."""
    pruning = Pruning(analysis, drop)
    zeroed = _zeroed_params(analysis, pruning)
    graph = copy.deepcopy(analysis.gm.graph)
    items = reference_items(analysis.gm, graph, zeroed)
    gm = build_graph_module(analysis.gm, graph, items)
    _insert_masks(gm, analysis, pruning)
    return gm


def _zeroed_params(analysis: Analysis, pruning: Pruning) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, dim in analysis.param_sinks:
        mask = pruning.kept(analysis.params[key][dim])
        if mask is None or bool(mask.all()):
            continue
        tensor = out.get(key, analysis.tensor(key)).detach().clone()
        shape = [1] * tensor.dim()
        shape[dim] = -1
        tensor = tensor * mask.view(shape).to(tensor.device, tensor.dtype)
        out[key] = tensor
    for alias, name in analysis.aliases.items():  # tied weights: every name sees the zeroed tensor
        if name in out:
            out[alias] = out[name]
    return out


def reference_items(gm: fx.GraphModule, graph: fx.Graph, zeroed: dict) -> dict:
    items: dict[str, Any] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            module = gm.get_submodule(node.target)
            items[node.target] = _with_tensors(module, str(node.target), zeroed)
        elif node.op == "get_attr":
            value = gm
            for part in str(node.target).split("."):
                value = getattr(value, part)
            items[node.target] = zeroed.get(str(node.target), value)
    return items


def _with_tensors(module: torch.nn.Module, prefix: str, zeroed: dict) -> torch.nn.Module:
    """The module itself, or a shallow copy whose zeroed tensors replace the originals."""
    if not any(k.startswith(prefix + ".") for k in zeroed):
        return module
    new = copy.copy(module)
    new.__dict__ = dict(module.__dict__)
    new._parameters = {n: (torch.nn.Parameter(zeroed[f"{prefix}.{n}"], p.requires_grad)
                           if f"{prefix}.{n}" in zeroed else p) for n, p in module._parameters.items()}
    new._modules = {n: _with_tensors(c, f"{prefix}.{n}", zeroed) for n, c in module._modules.items()}
    if hasattr(new, "_flat_weights_names"):  # RNNs cache their weights in a list
        new._flat_weights = [getattr(new, n) if hasattr(new, n) else None for n in new._flat_weights_names]
    return new


def _insert_masks(gm: fx.GraphModule, analysis: Analysis, pruning: Pruning) -> None:
    nodes = {n.name: n for n in gm.graph.nodes}
    for i, sink in enumerate(analysis.act_sinks):
        mask = pruning.kept(sink.ids)
        if mask is None or bool(mask.all()):
            continue
        node = nodes[sink.node]
        arg = node.args[sink.arg]
        like = meta_value(_old(analysis, arg))
        shape = [1] * like.dim()
        shape[sink.dim] = -1
        name = f"_fxprune_mask_{i}"
        gm.register_buffer(name, mask.view(shape).to(like.dtype).to(like.device))  # a bf16 model stays bf16
        with gm.graph.inserting_before(node):
            mask_node = gm.graph.get_attr(name)
            masked = gm.graph.call_function(torch.mul, (arg, mask_node))
        args = list(node.args)
        args[sink.arg] = masked
        node.args = tuple(args)
    gm.recompile()


def _old(analysis: Analysis, node: fx.Node) -> fx.Node:
    for old in analysis.gm.graph.nodes:
        if old.name == node.name:
            return old
    raise KeyError(node.name)


def _outputs(model: torch.nn.Module, inputs: tuple) -> list[torch.Tensor]:
    with torch.no_grad():
        out = model(*inputs)
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def eval_copy(model: torch.nn.Module) -> torch.nn.Module:
    """Running a training-mode model would update BatchNorm statistics, and running a prepared
    (observed) graph its observers' statistics, in any mode: run an eval copy instead."""
    stateful = model.training or any(is_quantizer(m) for m in model.modules())
    return copy.deepcopy(model).eval() if stateful else model


def output_masks(analysis: Analysis, drop: torch.Tensor) -> list[list[Optional[torch.Tensor]]]:
    """Kept positions per dim of each output leaf (all None when outputs are fixed interfaces)."""
    pruning = Pruning(analysis, drop)
    output = next(n for n in analysis.gm.graph.nodes if n.op == "output")
    leaves = [leaf for leaf in pytree.tree_leaves(output.args[0]) if isinstance(leaf, fx.Node)]
    return [[pruning.kept(i) for i in ids] for leaf in leaves for ids in _tensor_maps(analysis.env.get(leaf))]


def _tensor_maps(ids: Any) -> list[tuple]:
    """The channel map of each tensor inside a node's (possibly nested tuple) value, in order."""
    if isinstance(ids, tuple) and all(i is None or isinstance(i, torch.Tensor) for i in ids):
        return [ids]
    if isinstance(ids, (list, tuple)):
        return [m for item in ids for m in _tensor_maps(item)]
    return [()]


def _keep(tensor: torch.Tensor, masks: list[Optional[torch.Tensor]]) -> torch.Tensor:
    for dim, mask in enumerate(masks):
        if mask is not None and dim < tensor.dim():
            tensor = tensor.index_select(dim, mask.nonzero().flatten())
    return tensor


def compare(reference: torch.nn.Module, pruned: torch.nn.Module, inputs: tuple, exact: bool,
            tolerance: Optional[float] = None,
            masks: Optional[list[list[Optional[torch.Tensor]]]] = None) -> VerifyReport:
    """Run both models; ``masks`` select the reference outputs' kept positions (pruned outputs)."""
    ref_out = _outputs(eval_copy(reference), inputs)
    new_out = _outputs(eval_copy(pruned), inputs)
    if masks is not None and len(masks) == len(ref_out):
        ref_out = [_keep(t, m) for t, m in zip(ref_out, masks)]
    if len(ref_out) != len(new_out) or any(a.shape != b.shape for a, b in zip(ref_out, new_out)):
        raise VerificationError(f"pruned outputs have shapes {[tuple(t.shape) for t in new_out]}, "
                                f"expected {[tuple(t.shape) for t in ref_out]}")
    abs_err = max((float((a.double() - b.double()).abs().max()) for a, b in zip(ref_out, new_out)
                   if a.numel()), default=0.0)
    scale = max((float(a.double().abs().max()) for a in ref_out if a.numel()), default=0.0)
    tol = tolerance if tolerance is not None else _default_tolerance(ref_out)
    rel = abs_err / max(scale, 1e-12)
    passed = not exact or rel <= tol or abs_err <= tol
    return VerifyReport(abs_err, rel, exact, passed, tol)


def _default_tolerance(outputs: list[torch.Tensor]) -> float:
    low = any(t.dtype in (torch.float16, torch.bfloat16) for t in outputs)
    return 2e-2 if low else 1e-4
