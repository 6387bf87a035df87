"""No silent gaps: every tensor a graph reads is in a group, or listed with the reason it is not.

A parameter or buffer joins a group when one of its dims holds channels that a producer opens (a
linear's rows, an embedding's dim) or that are tied to them (a norm's weight, a consumer's columns).
:func:`ungrouped` lists every other tensor the graph reads — a ``get_attr`` at the export level, a
called module's parameters and buffers at the fx level — with why it stays as it is:

- ``"a scalar"``: no dim to prune (BatchNorm's ``num_batches_tracked``, a ``logit_scale``);
- ``"frozen: ..."``: its channels meet an op without a rule, a graph output... (the freeze reason);
- ``"its dims hold no channel ..."``: it is read, but no dim of it is tied to a channel space (a
  causal-mask buffer indexed by sequence position, rotary frequencies of frozen heads, an op's
  constant) — the node that reads it is named, so a rule that should produce channels is easy to find;
- ``"read by no node"``: a ``get_attr`` nothing uses (export keeps HF's ``original_inv_freq``);
- ``"dim d: its channels reach the graph, but no producer opens them"``: a tensor in a group (by its
  input columns, say) whose other dim carries channels into the graph that no rule declared a producer
  of — the gap Falcon's ``x @ self.weight.T`` had before ``rules.linear`` saw through the transpose.
  :func:`silent_gaps` reports these, and anything neither grouped nor listed, as broken promises.

>>> analysis = fxprune.analyze(model, (x,), "export")        # doctest: +SKIP
>>> fxprune.core.ungrouped.ungrouped(analysis)                          # doctest: +SKIP
{'model.causal_mask': "its dims hold no channel (read by node 'slice_3' (aten.slice.Tensor))"}
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Iterator, Optional

import torch
import torch.fx as fx

from fxprune.core.graph import describe_target, iter_arrays, tensor_at

if TYPE_CHECKING:
    from fxprune.core.analysis import Analysis


DIM_GAP = "no producer opens them"
DEAD = "read by no node (a dead get_attr)"


def graph_tensors(gm: fx.GraphModule) -> Iterator[tuple[str, torch.Tensor, fx.Node]]:
    """Every (name, tensor, first node reading it) of ``gm``: get_attr tensors and called modules'
    parameters and buffers, in graph order, each name once."""
    seen: set[str] = set()
    for node in gm.graph.nodes:
        for name, tensor in _tensors_of(gm, node):
            if name not in seen:
                seen.add(name)
                yield name, tensor, node


def _tensors_of(gm: fx.GraphModule, node: fx.Node) -> Iterator[tuple[str, torch.Tensor]]:
    if node.op == "get_attr":
        tensor = tensor_at(gm, str(node.target), missing_ok=True)
        if tensor is not None:
            yield str(node.target), tensor
    elif node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        yield from ((f"{node.target}.{n}", t) for n, t in module.named_parameters(recurse=True))
        yield from ((f"{node.target}.{n}", t) for n, t in module.named_buffers(recurse=True))


def ungrouped(analysis: "Analysis") -> dict[str, str]:
    """``{name: reason}`` for every tensor the graph reads that is in no group, and for every tensor
    with a dim whose channels reach an activation while no group holds them (canonical names: a tied
    weight is listed once)."""
    grouped = {analysis.canonical(m.key) for g in analysis.groups for m in g.members}
    loose = _loose_classes(analysis)
    out: dict[str, str] = {}
    for name, tensor, node in graph_tensors(analysis.gm):
        key = analysis.canonical(name)
        if key in out:
            continue
        if key not in grouped:
            out[key] = _reason(analysis, key, tensor, node)
            continue
        dim = _loose_dim(analysis, key, loose)
        if dim is not None:
            out[key] = f"dim {dim}: its channels reach the graph, but {DIM_GAP} (no group)"
    return out


def _loose_classes(analysis: "Analysis") -> torch.Tensor:
    """Bool per id, true on classes that some activation carries but no group holds and nothing froze."""
    solution = analysis.solution
    values = [v for node, v in analysis.env.items() if node.op != "get_attr"]  # activations, not the tensors
    arrays = [ids[ids >= 0] for ids in iter_arrays(values)]
    loose = torch.zeros(solution.root.numel(), dtype=torch.bool)
    if arrays:
        loose[solution.root[torch.cat(arrays)]] = True
    for group in analysis.groups:
        loose[torch.tensor(group.units, dtype=torch.long)] = False
    return loose & ~solution.frozen


def _loose_dim(analysis: "Analysis", key: str, loose: torch.Tensor) -> Optional[int]:
    for dim, ids in enumerate(analysis.params.get(key, ())):
        if ids is not None and ids.numel() > 1 and bool(loose[analysis.solution.root[ids[ids >= 0]]].any()):
            return dim
    return None


def _reason(analysis: "Analysis", key: str, tensor: torch.Tensor, node: fx.Node) -> str:
    if tensor.dim() == 0 or tensor.numel() == 1:
        return "a scalar"
    frozen = _freeze_reason(analysis, key)
    if frozen is not None:
        return f"frozen: {frozen}"
    if node.op == "get_attr" and not node.users:
        return DEAD
    reader = next(iter(node.users)) if node.op == "get_attr" else node
    return f"its dims hold no channel (read by node {reader.name!r} ({describe_target(reader)}))"


def _freeze_reason(analysis: "Analysis", key: str) -> Optional[str]:
    solution = analysis.solution
    for ids in analysis.params.get(key, ()):
        if ids is None:
            continue
        roots = solution.root[ids[ids >= 0]].unique()
        for root in roots[solution.frozen[roots]].tolist():
            if root in solution.reasons:
                return solution.reasons[root]
    return None


def silent_gaps(analysis: "Analysis") -> dict[str, str]:
    """What would break the promise, ``{name: what is wrong}`` (empty when kept): a tensor the graph
    reads that is neither grouped nor listed, a dim whose channels no producer opens, or a weight (a
    parameter with two or more dims) in no group without a freeze reason that names an op (or read by
    no node at all: eval-mode export keeps GoogLeNet's unused auxiliary heads as dead get_attrs)."""
    listed = ungrouped(analysis)
    grouped = {analysis.canonical(m.key) for g in analysis.groups for m in g.members}
    out: dict[str, str] = {}
    for name, tensor, _ in graph_tensors(analysis.gm):
        key = analysis.canonical(name)
        reason = listed.get(key)
        if key not in grouped and reason is None:
            out[key] = "neither in a group nor listed"
        elif reason is not None and DIM_GAP in reason:
            out[key] = reason
        elif reason is not None and isinstance(tensor, torch.nn.Parameter) and tensor.dim() >= 2 \
                and not reason.startswith("frozen: ") and reason != DEAD:
            out[key] = f"a weight in no group: {reason}"
    return out
