"""``propagate_bias``: fold what a dropped channel still contributes into its consumers' biases.

Pruning by default treats a dropped channel as contributing nothing (the zeroed-channel reference). With
``propagate_bias=True`` the reference is the model whose dropped channels' producer weights are zeroed but
whose biases stay — as torch.ao's pruner does with ``prune_bias=False`` — so each dropped channel carries
a constant (its bias through BatchNorm and activations). One run of that reference records each consumer's
input; the dropped channels' mean value times the consumer's weight columns is added to the consumer's
bias. Exact for linear consumers and unpadded convs; a padded conv's border sees zeros instead of the
constant, so the group is reported approximate. Consumers without a bias, or not a conv/linear (an RNN's
recurrence), keep the default behaviour.

Verify's side: where folding is exact, the reference is that constant-carrying model (its norms' statistics
over kept positions, as in :mod:`fxprune.verify`); where it is not, the reference is the zeroed-channel one
whose folded consumers' biases absorb the contribution measured on the prune's example inputs
(:func:`folded_biases`), so the whole model is still checked exactly.
"""
from __future__ import annotations

import copy

import torch
import torch.fx as fx

from fxprune.core.channels import Dropped
from fxprune.core.analysis import Analysis
from fxprune.core.graph import tensor_at
from fxprune.core.opcall import WeightedConsumer
from fxprune.core.capture import node_values
from fxprune.core.rewrite import Pruning, build_graph_module
from fxprune.core.verify import kept_statistics, reference_items


def constant_reference(analysis: Analysis, drop: Dropped) -> fx.GraphModule:
    """The original graph with dropped channels' producer slices zeroed (biases kept)."""
    pruning = Pruning(analysis, drop)
    zeroed: dict[str, torch.Tensor] = {}
    for producer in analysis.producers:
        mask = pruning.kept(analysis.params[producer.key][producer.dim])
        if mask is None or bool(mask.all()):
            continue
        tensor = zeroed.get(producer.key, analysis.tensor(producer.key)).detach().clone()
        shape = [1] * tensor.dim()
        shape[producer.dim] = -1
        zeroed[producer.key] = tensor * mask.view(shape).to(tensor.device, tensor.dtype)
    graph = copy.deepcopy(analysis.gm.graph)
    gm = build_graph_module(analysis.gm, graph, reference_items(analysis.gm, graph, zeroed))
    kept_statistics(gm, analysis, pruning)
    return gm


def folded_biases(analysis: Analysis, drop: Dropped, inputs: tuple) -> dict[str, torch.Tensor]:
    """Each folded consumer's original bias plus the dropped inputs' contribution measured on ``inputs``
    (full size): the biases the zeroed-channel reference needs to stand for a folded model."""
    out = {}
    for key, contribution in _contributions(analysis, drop, inputs).items():
        bias = analysis.tensor(key).detach()
        out[key] = bias + contribution.to(bias.device, bias.dtype)
    return out


def fold_biases(analysis: Analysis, drop: Dropped, pruned: fx.GraphModule, inputs: tuple) -> None:
    """Add dropped inputs' constant contributions to the pruned consumers' biases (in place: ``pruned``
    is the new model rewrite just built, never the input)."""
    pruning = Pruning(analysis, drop)
    for key, contribution in _contributions(analysis, drop, inputs).items():
        kept_out = pruning.kept(analysis.params[key][0])
        bias = tensor_at(pruned, key)
        with torch.no_grad():
            bias.add_(contribution[kept_out.to(contribution.device)].to(bias.dtype))


def _contributions(analysis: Analysis, drop: Dropped, inputs: tuple) -> dict[str, torch.Tensor]:
    """{consumer bias key: what its dropped inputs' constants add to each output row}, summed over the
    consumer's calls, measured by one run of :func:`constant_reference`."""
    pruning = Pruning(analysis, drop)
    todo = [f for f in analysis.weighted_consumers if f.bias is not None and _dropped(pruning, analysis, f).any()]
    if not todo:
        return {}
    with torch.no_grad():
        values = node_values(constant_reference(analysis, drop), inputs, {f.input for f in todo})
    out: dict[str, torch.Tensor] = {}
    for f in todo:
        contribution = _contribution(analysis, pruning, f, values[f.input])
        out[f.bias] = out[f.bias] + contribution if f.bias in out else contribution
    return out


def folding_is_exact(analysis: Analysis, drop: Dropped) -> bool:
    """Exact when every consumer of a dropped channel is a weighted conv/linear consumer with a bias and no
    padding; any other consumer (a matmul, an RNN, a bias-less layer) sees the constant unanswered."""
    pruning = Pruning(analysis, drop)
    folded = {f.weight for f in analysis.weighted_consumers if f.bias is not None and f.exact}
    for key, dim in analysis.param_sinks:
        if key not in folded and not bool(pruning.kept(analysis.params[key][dim]).all()):
            return False
    return all(bool(pruning.kept(sink.ids).all()) for sink in analysis.act_sinks)


def _dropped(pruning: Pruning, analysis: Analysis, f: WeightedConsumer) -> torch.Tensor:
    return ~pruning.kept(analysis.params[f.weight][f.in_dim])


def _contribution(analysis: Analysis, pruning: Pruning, f: WeightedConsumer, value: torch.Tensor) -> torch.Tensor:
    dropped = _dropped(pruning, analysis, f)
    dims = [d for d in range(value.dim()) if d != f.channel_dim % value.dim()]
    mean = value.double().mean(dim=dims) if dims else value.double()
    weight = analysis.tensor(f.weight).detach().double()
    weight = weight.index_select(f.in_dim, dropped.nonzero().flatten().to(weight.device))
    shape = [1] * weight.dim()
    shape[f.in_dim] = -1
    per_out = 1 - f.in_dim  # conv/linear: out rows are dim 0; transposed conv: dim 1
    return (weight * mean[dropped.to(mean.device)].view(shape)).sum(dim=[d for d in range(weight.dim()) if d != per_out])

