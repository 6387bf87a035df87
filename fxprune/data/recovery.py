"""Recovery: repair a pruned model from calibration data, in one shot (no gradient steps).

Structural pruning (verified exact) leaves each consumer of a dropped channel without that channel's
contribution, and every BatchNorm with statistics measured on the unpruned network. Three repairs,
each a pure function ``(source, pruned, calibration) -> (new GraphModule, RecoveryReport)`` that
never edits its inputs, at either graph level:

- :func:`recalibrate_batchnorm`: re-estimate every BatchNorm's running mean and variance on the pruned
  model (fx: ``nn.BatchNorm*`` modules; export: ``aten.batch_norm`` /
  ``_native_batch_norm_legit_no_training`` reading buffers). As torch's ``update_bn`` does, each
  BatchNorm normalises a batch with that batch's own statistics while they are gathered; the new
  running statistics are the population moments over all batches (unbiased variance).
- :func:`compensate_bias`: add each dropped input channel's *mean* contribution (its mean over the
  calibration data in the original model, times the consumer's weight columns) to the consumer's
  bias, creating the bias where the layer has none.
- :func:`reconstruct`: for each conv/linear consumer of a dropped channel, in graph order, the
  least-squares weights (and bias) over its kept inputs that make its output match the original's:
  ``W = (C + λW₀) (G + λD)⁻¹`` from the Gram matrix ``G = Σ x̃x̃ᵀ`` of the inputs the *pruned* model
  really produces (earlier layers already refitted) and the cross moments ``C = Σ y x̃ᵀ`` with the
  original layer's output, in float64; ``λ`` is ``ridge`` times the Gram's mean diagonal, and the
  ridge pulls toward the layer's kept weights ``W₀`` (not toward zero): a fit from few calibration
  rows stays near weights that generalise (a real LLM's MLP has more inputs than 8 windows have tokens). A Gram matrix the
  requested ridge cannot invert falls back to a larger ridge with a :class:`RecoveryWarning` naming the
  layer. The report gives each layer's relative output error (``‖ŷ - y‖ / ‖y‖`` over the calibration
  data) before and after its fit.

:func:`reconstruct` walks both models through the calibration data once, every batch together
(:mod:`fxprune.data.sequential`): each node runs once per batch, so its cost is linear in depth; it
holds every batch's live activations plus one Gram matrix and its cross moments. All
moments are :class:`~fxprune.data.calibration.Sums`, so they add over ``torch.distributed`` ranks.

Each repair is one :class:`RecoveryStep` record in :data:`RECOVERY_STEPS` (name, short names, whether it
compares with the original model, how it runs): ``fxprune.prune(recover=...)`` and the recovery passes
(:mod:`fxprune.passes.recovery_data`, one registered pass per record, of the same name) both dispatch
through it. Adding a repair is one function, one record, one pass class and their tests.

>>> result = fxprune.prune(model, (x,), sparsity=0.5, calibration=loader,
...                        recover=("reconstruct", "batchnorm"))              # doctest: +SKIP
>>> print(result.recovery[0])                                                  # doctest: +SKIP
reconstruct: 6 layers, relative output error 0.412 -> 0.087 (median) ...
"""
from __future__ import annotations

import copy
import math
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
import torch.fx as fx
import torch.nn as nn

from fxprune.core.channels import Dropped
from fxprune.core.analysis import Analysis
from fxprune.core.graph import describe_target, free_attribute, set_aten_bias, tensor_at
from fxprune.core.opcall import WeightedConsumer
from fxprune.data.calibration import (GramSite, Site, Sums, as_calibration, check_batch, check_finite, collect,
                          conv_unfold, eval_mode, fixed_batch_size, gram_features, placeholder_shapes,
                          real_feature_rows, split_batch, split_masked)
from fxprune.core.capture import MutableArgs, graph_level, node_values
from fxprune.data.sequential import Stop, walk_moments
from fxprune.errors import CalibrationError, InvalidOptionError, NonFiniteActivationError
from fxprune.progress import progress_bar
from fxprune.core.rewrite import Pruning

aten = torch.ops.aten

_BATCH_NORM_OPS = {aten.batch_norm.default: 7, aten._native_batch_norm_legit_no_training.default: 6}


class RecoveryWarning(UserWarning):
    """A recovery step had to deviate from what was asked (a singular Gram matrix: more ridge)."""


# --- reports --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerRecovery:
    """What one recovery step did to one layer."""

    layer: str
    """The layer's module (fx) or weight/buffer owner (export) name."""
    before: float
    """reconstruct: relative output error before the fit; recalibrate-batchnorm: the old mean's
    distance from the new (relative to the new std); compensate-bias: ‖bias‖ before."""
    after: float
    """reconstruct: relative output error after the fit; recalibrate-batchnorm: 0; compensate-bias:
    ‖bias‖ after."""
    note: str = ""


@dataclass(frozen=True)
class RecoveryReport:
    """The report of one recovery step: per layer, and the layers it left alone with the reason."""

    step: str
    layers: tuple[LayerRecovery, ...]
    skipped: tuple[tuple[str, str], ...] = ()
    batches: int = 0
    seconds: float = 0.0

    @property
    def modified(self) -> bool:
        return bool(self.layers)

    def __str__(self) -> str:
        head = {"reconstruct": "relative output error before -> after",
                "recalibrate-batchnorm": "|old mean - new mean| / new std (max)",
                "compensate-bias": "bias norm before -> after"}.get(self.step, "before -> after")
        lines = [f"{self.step}: {len(self.layers)} layers from {self.batches} batches in "
                 f"{self.seconds:.2f} s ({head})"]
        lines += [f"  {r.layer}: {r.before:.4g} -> {r.after:.4g}{'  ' + r.note if r.note else ''}"
                  for r in self.layers]
        lines += [f"  {name}: skipped ({why})" for name, why in self.skipped]
        return "\n".join(lines)


def check_ridge(ridge: Any, where: str = "reconstruct") -> float:
    if isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or not ridge >= 0 or math.isinf(ridge):
        raise InvalidOptionError(f"ridge of {where!r} must be a finite float >= 0, got {ridge!r}")
    return float(ridge)


# --- running graphs on calibration batches ------------------------------------------------------------
def values_at(gm: fx.GraphModule, inputs: tuple, names: set[str], index: int = 0) -> dict[str, Any]:
    """The values of the nodes ``names`` on ``inputs`` (the graph runs only as far as needed)."""
    try:
        values = node_values(gm, inputs, names)
    except NonFiniteActivationError:
        raise
    except Exception as exc:
        raise CalibrationError(f"the model rejects calibration batch {index} (inputs of shapes "
                               f"{[tuple(x.shape) for x in inputs]}): {type(exc).__name__}: "
                               f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}") from exc
    nodes = {n.name: n for n in gm.graph.nodes}
    for name, value in values.items():
        check_finite(nodes[name], value, index)
    return values


def calibration_chunks(gm: fx.GraphModule, calibration: Any) -> Iterator[tuple[int, tuple]]:
    """``(batch index, model inputs)`` for every calibration batch, checked against the graph's example
    inputs and split to an export graph's fixed batch size; at least one batch or a CalibrationError."""
    for index, chunk, _ in masked_chunks(gm, calibration):
        yield index, chunk


def masked_chunks(gm: fx.GraphModule, calibration: Any) -> Iterator[tuple[int, tuple, Optional[torch.Tensor]]]:
    """:func:`calibration_chunks` with each chunk's token mask (None where it pads nothing)."""
    calibration = as_calibration(calibration)
    expected = placeholder_shapes(gm)
    size = fixed_batch_size(gm)
    for index, inputs, _, mask in calibration.read(len(expected)):
        check_batch(inputs, expected, index)
        for chunk, part in split_masked(inputs, mask, size, index):
            yield index, chunk, part


# --- which layers ---------------------------------------------------------------------------------
def _layer_name(key: str) -> str:
    return key.rsplit(".", 1)[0] if "." in key else key


def _dropped_consumers(analysis: Analysis, drop: Dropped) -> list[tuple[WeightedConsumer, torch.Tensor]]:
    """Each conv/linear consumer whose input lost channels, with the kept mask of its input dim."""
    pruning = Pruning(analysis, drop)
    out = []
    for f in analysis.weighted_consumers:
        kept = pruning.kept(analysis.params[f.weight][f.in_dim])
        if kept is not None and not bool(kept.all()):
            out.append((f, kept))
    return out


def _weight_users(gm: fx.GraphModule) -> dict[str, int]:
    """How many nodes use each weight (a shared weight cannot be refitted for one of them)."""
    counts: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            keys = [f"{node.target}.weight"]
        elif node.op == "get_attr":
            keys = [str(node.target)]
        else:
            continue
        for key in keys:
            counts[key] = counts.get(key, 0) + 1
    return counts


# --- writing weights and biases into the new model ------------------------------------------------------
def _set_bias(gm: fx.GraphModule, level: str, f: WeightedConsumer, node: fx.Node, value: torch.Tensor) -> None:
    """Write ``value`` into the consumer's bias, creating one (a Parameter) where the layer has none."""
    weight = tensor_at(gm, f.weight)
    if f.bias is not None:
        with torch.no_grad():
            tensor_at(gm, f.bias).copy_(value)
        return
    bias = nn.Parameter(value.to(weight.dtype).clone(), requires_grad=weight.requires_grad)
    owner_name, _, _ = f.weight.rpartition(".")
    owner = gm.get_submodule(owner_name) if owner_name else gm
    if level == "fx":
        owner.bias = bias  # Conv/Linear read self.bias in forward: the code does not change
        return
    target = free_attribute(gm, owner_name, set())
    owner.register_parameter(target.rpartition(".")[2], bias)
    set_aten_bias(gm.graph, node, target)
    gm.recompile()


def _bias_value(gm: fx.GraphModule, f: WeightedConsumer, out_features: int, like: torch.Tensor) -> torch.Tensor:
    if f.bias is None:
        return torch.zeros(out_features, dtype=torch.float64, device=like.device)
    return tensor_at(gm, f.bias).detach().double()


# --- recalibrate-batchnorm ----------------------------------------------------------------------
@dataclass(frozen=True)
class _Norm:
    """A BatchNorm node: where its input, affine parameters and running buffers are."""

    node: str
    mean: str
    var: str
    layer: str


def batch_norms(gm: fx.GraphModule) -> list[_Norm]:
    """Every BatchNorm with running statistics, at either level, in graph order."""
    out = []
    for node in gm.graph.nodes:
        if node.op == "call_module":
            module = gm.get_submodule(str(node.target))
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.running_mean is not None:
                out.append(_Norm(node.name, f"{node.target}.running_mean", f"{node.target}.running_var",
                                 str(node.target)))
        elif node.op == "call_function" and node.target in _BATCH_NORM_OPS:
            mean, var = node.args[3], node.args[4]
            if isinstance(mean, fx.Node) and mean.op == "get_attr" and isinstance(var, fx.Node) \
                    and var.op == "get_attr":
                out.append(_Norm(node.name, str(mean.target), str(var.target), _layer_name(str(mean.target))))
    return out


class _BatchStatistics(MutableArgs, fx.Interpreter):
    """Runs a graph with every BatchNorm normalising by its batch's statistics, summing its input's
    per-channel moments (dim 1) into ``sums``."""

    def __init__(self, gm: fx.GraphModule, norms: dict[str, _Norm], sums: Sums, index: int):
        super().__init__(gm)
        self.norms, self.sums, self.index = norms, sums, index

    def run_node(self, n: fx.Node) -> Any:
        if n.name not in self.norms:
            return super().run_node(n)
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        x = args[0]
        check_finite(n.args[0], x, self.index)
        dims = [d for d in range(x.dim()) if d != 1]
        xd = x.detach().double()
        self.sums.add(f"{n.name}:sum", xd.sum(dims))
        self.sums.add(f"{n.name}:sq", (xd * xd).sum(dims))
        self.sums.add(f"{n.name}:count", torch.tensor(float(x.numel() // x.shape[1])))
        mean, var = x.mean(dims), x.var(dims, unbiased=False)
        if n.op == "call_module":
            bn = self.module.get_submodule(str(n.target))
            return torch.nn.functional.batch_norm(x, mean, var, bn.weight, bn.bias, False, 0.0, bn.eps)
        args = list(args)
        args[3], args[4] = mean, var
        return n.target(*args, **kwargs)


def recalibrate_batchnorm(pruned: fx.GraphModule, calibration: Any, progress: bool = False
                          ) -> tuple[fx.GraphModule, RecoveryReport]:
    """A copy of ``pruned`` whose BatchNorms hold running statistics measured on ``calibration``.

    >>> new, report = recalibrate_batchnorm(result.graph_module, loader)   # doctest: +SKIP
    """
    t0 = time.perf_counter()
    out = copy.deepcopy(pruned)
    norms = {n.node: n for n in batch_norms(out)}
    sums, batches = Sums(), set()
    with torch.no_grad(), eval_mode(out):
        for index, inputs, mask in progress_bar(list(masked_chunks(out, calibration)), progress,
                                                 desc="recalibrate-batchnorm", unit="batch"):
            if mask is not None and norms:  # its batch statistics normalise the batch itself, pads included
                raise CalibrationError(f"recalibrate-batchnorm: calibration batch {index} is padded "
                                       f"(attention_mask); a BatchNorm normalises each batch by its own "
                                       f"statistics, padding included: pass unpadded batches")
            _BatchStatistics(out, norms, sums, index).run(*inputs)
            batches.add(index)
    sums.all_reduce()
    layers = [_write_statistics(out, norm, sums) for norm in norms.values() if f"{norm.node}:count" in sums]
    return out, RecoveryReport("recalibrate-batchnorm", tuple(layers), (), len(batches),
                               time.perf_counter() - t0)


def _write_statistics(gm: fx.GraphModule, norm: _Norm, sums: Sums) -> LayerRecovery:
    n = sums[f"{norm.node}:count"]
    mean = sums[f"{norm.node}:sum"] / n
    var = (sums[f"{norm.node}:sq"] / n - mean ** 2).clamp_min(0) * n / (n - 1).clamp_min(1)
    running_mean, running_var = tensor_at(gm, norm.mean), tensor_at(gm, norm.var)
    shift = float(((running_mean.double() - mean).abs() / var.sqrt().clamp_min(1e-12)).max())
    with torch.no_grad():
        running_mean.copy_(mean.to(running_mean.dtype))
        running_var.copy_(var.to(running_var.dtype))
    return LayerRecovery(norm.layer, shift, 0.0)


# --- compensate-bias ------------------------------------------------------------------------------
def compensate_bias(analysis: Analysis, drop: Dropped, pruned: fx.GraphModule, calibration: Any,
                    progress: bool = False) -> tuple[fx.GraphModule, RecoveryReport]:
    """A copy of ``pruned`` whose consumers of dropped channels add those channels' mean contribution
    (measured on ``calibration`` in the original model ``analysis.gm``) to their bias.

    >>> new, report = compensate_bias(result.analysis, result.drop, result.graph_module, loader)  # doctest: +SKIP
    """
    t0 = time.perf_counter()
    consumers = _dropped_consumers(analysis, drop)
    nodes = {n.name: n for n in analysis.gm.graph.nodes}
    sites = {f.input: Site(f.input, f.channel_dim, int(kept.numel())) for f, kept in consumers}
    stats = collect(analysis.gm, calibration, list(sites.values()), progress=progress)
    out = copy.deepcopy(pruned)
    out_nodes = {n.name: n for n in out.graph.nodes}
    level, pruning = graph_level(out), Pruning(analysis, drop)
    layers = []
    for f, kept in consumers:
        weight = analysis.tensor(f.weight).detach().double()
        delta = _mean_contribution(weight, f.in_dim, ~kept, stats.mean(f.input).to(weight.device))
        kept_out = pruning.kept(analysis.params[f.weight][1 - f.in_dim])
        delta = delta if kept_out is None else delta[kept_out.to(delta.device)]
        bias = _bias_value(out, f, delta.numel(), delta)
        _set_bias(out, level, f, out_nodes[f.node], (bias + delta).to(tensor_at(out, f.weight).dtype))
        layers.append(LayerRecovery(_layer_name(f.weight), float(bias.norm()), float((bias + delta).norm()),
                                    f"{int((~kept).sum())} dropped inputs"))
    return out, RecoveryReport("compensate-bias", tuple(layers), (), stats.batches, time.perf_counter() - t0)


def _mean_contribution(weight: torch.Tensor, in_dim: int, dropped: torch.Tensor,
                       mean: torch.Tensor) -> torch.Tensor:
    """Per output channel: Σ over dropped inputs c (and the kernel) of ``W[..c..] * mean[c]``."""
    cols = weight.index_select(in_dim, dropped.nonzero().flatten().to(weight.device))
    shape = [1] * weight.dim()
    shape[in_dim] = -1
    per_out = 1 - in_dim  # conv/linear: outputs are dim 0; a transposed conv's: dim 1
    return (cols * mean[dropped.to(mean.device)].view(shape)).sum(
        dim=[d for d in range(weight.dim()) if d != per_out])


# --- reconstruct ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Fit:
    """One consumer to refit: its Gram site (original shapes) and the kept rows/columns."""

    consumer: WeightedConsumer
    site: GramSite
    kept_in: torch.Tensor
    kept_out: Optional[torch.Tensor]
    out_dim: int


def _fits(analysis: Analysis, drop: Dropped) -> tuple[list[_Fit], list[tuple[str, str]]]:
    nodes = {n.name: n for n in analysis.gm.graph.nodes}
    users = _weight_users(analysis.gm)
    pruning = Pruning(analysis, drop)
    fits, skipped = [], []
    for f, kept in _dropped_consumers(analysis, drop):
        site, why = _gram_site(analysis, nodes[f.node], f, users)
        if site is None:
            skipped.append((_layer_name(f.weight), why))
            continue
        kept_out = pruning.kept(analysis.params[f.weight][0])
        out_dim = 1 if site.unfold is not None else -1
        fits.append(_Fit(f, site, kept, kept_out, out_dim))
    return fits, skipped


def _gram_site(analysis: Analysis, node: fx.Node, f: WeightedConsumer, users: dict[str, int]
               ) -> tuple[Optional[GramSite], str]:
    weight = analysis.tensor(f.weight)
    if users.get(f.weight, 1) > 1:
        return None, "its weight is shared by several layers"
    if f.in_dim != 1:
        return None, "a transposed conv (only conv2d and linear are refitted)"
    if weight.dim() == 2:
        return GramSite(f.node, f.input, f.channel_dim, f.weight, weight.shape[1]), ""
    unfold = conv_unfold(analysis.gm, node) if weight.dim() == 4 else None
    if unfold is None:
        return None, f"{describe_target(node)} is not an ungrouped, zero-padded conv2d"
    return GramSite(f.node, f.input, f.channel_dim, f.weight, weight.shape[1] * math.prod(weight.shape[2:]),
                    unfold), ""


def reconstruct(analysis: Analysis, drop: Dropped, pruned: fx.GraphModule, calibration: Any,
                ridge: float = 1e-3, progress: bool = False) -> tuple[fx.GraphModule, RecoveryReport]:
    """A copy of ``pruned`` whose consumers of dropped channels are refitted, layer after layer in graph
    order, to reproduce the original model's (``analysis.gm``) outputs on ``calibration``.

    >>> new, report = reconstruct(result.analysis, result.drop, result.graph_module, loader)  # doctest: +SKIP
    >>> print(report)                                                                            # doctest: +SKIP
    """
    t0 = time.perf_counter()
    ridge = check_ridge(ridge)
    stops, skipped = reconstruct_stops(analysis, drop)
    out = copy.deepcopy(pruned)
    chunks = list(masked_chunks(out, calibration))
    masks = [mask for _, _, mask in chunks]
    bar = progress_bar(None, progress, desc="reconstruct", unit="layer", total=len(stops))

    def refit(stop: Stop, targets: list, inputs: list) -> LayerRecovery:
        if bar is not None:
            bar.update(1)
        return refit_layer(out, stops[stop], targets, inputs, ridge, masks)

    with torch.no_grad(), eval_mode(analysis.gm), eval_mode(out):  # each node once per batch
        layers, _, _ = walk_moments(analysis.gm, out, list(stops), [c for _, c, _ in chunks], refit,
                                     finish=False)  # nothing reads the outputs (an LM's logits: its costliest layer)
    if bar is not None:
        bar.close()
    return out, RecoveryReport("reconstruct", tuple(layers), tuple(skipped), len({i for i, _, _ in chunks}),
                               time.perf_counter() - t0)


def reconstruct_stops(analysis: Analysis, drop: Dropped) -> tuple[dict[Stop, _Fit], list[tuple[str, str]]]:
    """The layers :func:`reconstruct` refits, each under the :class:`~fxprune.data.sequential.Stop` a
    walk halts at, and the layers it leaves (with why): for a caller that drives the walk itself
    (:mod:`fxprune.hf.layerwise`, weights read from disk)."""
    fits, skipped = _fits(analysis, drop)
    return {Stop(f.site.node, f.site.input, f.consumer.node): f for f in fits}, skipped


def refit_layer(gm: fx.GraphModule, fit: _Fit, targets: list, inputs: list, ridge: float,
                masks: Optional[list] = None) -> LayerRecovery:
    """One layer of :func:`reconstruct`: the moments of the walk's values at its stop (per batch, the
    original layer's outputs and the pruned layer's inputs; summed over ranks; real tokens only where
    ``masks`` pads some), then the ridge fit written into ``gm``'s weight and bias."""
    node = next(n for n in gm.graph.nodes if n.name == fit.consumer.node)
    return _refit(gm, graph_level(gm), fit, node, _fit_moments(fit, targets, inputs, masks), ridge)


def _fit_moments(fit: _Fit, targets: list, inputs: list, masks: Optional[list] = None) -> Sums:
    """``G = Σ x̃x̃ᵀ`` of the pruned layer's inputs (with a ones column), ``C = Σ x̃yᵀ`` with the
    original layer's outputs, ``Σ‖y‖²``, over every batch (per batch: ``targets`` of the original
    layer, ``inputs`` of the pruned one, from one sequential walk: :mod:`fxprune.data.sequential`),
    over real tokens only where a batch's ``masks`` entry pads some positions."""
    sums, site = Sums(), fit.site
    for index, (y, x) in enumerate(zip(targets, inputs)):
        mask = masks[index] if masks else None
        per_sample = max(1, y.numel() // (y.shape[fit.out_dim] * max(1, y.shape[0])))
        step = max(1, _ROWS // per_sample)
        parts = mask.split(step) if mask is not None else [None] * len(x.split(step))
        for xs, ys, part in zip(x.split(step), y.split(step), parts):  # a few samples at a time, float64
            target = ys.movedim(fit.out_dim, -1).reshape(-1, ys.shape[fit.out_dim])
            if fit.kept_out is not None:
                target = target[:, fit.kept_out.to(target.device)]
            rows = gram_features(xs, site)
            if part is not None:
                real = real_feature_rows(part, xs, site, index)
                rows, target = rows[real], target[real]
            wide = torch.promote_types(rows.dtype, torch.float32)
            _add_moments(sums, rows.to(wide), target.to(wide))
    return sums.all_reduce()


_ROWS = 4096
"""Rows (output positions) unfolded and converted to float64 at once: bounds the temporaries beside
the Gram matrix to a slice of the batch."""


def _add_moments(sums: Sums, rows: torch.Tensor, target: torch.Tensor) -> None:
    """``[X 1]ᵀ[X 1]`` and ``[X 1]ᵀY`` without building ``[X 1]``: the ones column is the row sums.
    One chunk's products are taken in the rows' dtype (float32 for a float32 or bf16 model: a chunk
    sums at most ``_ROWS`` products, half float64's cost) and accumulated in float64 across chunks."""
    n = torch.tensor([[float(rows.shape[0])]], dtype=torch.float64, device=rows.device)
    col = rows.double().sum(0, keepdim=True)
    sums.add("gram", torch.cat([torch.cat([(rows.T @ rows).double(), col.T], 1), torch.cat([col, n], 1)], 0))
    wide = target.double()
    sums.add("cross", torch.cat([(rows.T @ target).double(), wide.sum(0, keepdim=True)], 0))
    sums.add("yy", (wide * wide).sum())


def _refit(gm: fx.GraphModule, level: str, fit: _Fit, node: fx.Node, sums: Sums, ridge: float
           ) -> LayerRecovery:
    gram, cross, yy = sums["gram"], sums["cross"], float(sums["yy"])
    weight = tensor_at(gm, fit.consumer.weight)
    old = torch.cat([weight.detach().double().reshape(weight.shape[0], -1),
                     _bias_value(gm, fit.consumer, weight.shape[0], gram).unsqueeze(1)], dim=1)
    layer = _layer_name(fit.consumer.weight)
    solution, rhs, damping = _damped_solve(gram, cross, ridge, layer, old.T)
    new = solution.T
    with torch.no_grad():
        weight.copy_(new[:, :-1].reshape(weight.shape).to(weight.dtype))
    _set_bias(gm, level, fit.consumer, node, new[:, -1].to(weight.dtype))
    before = relative_error(old, gram.float(), cross, yy)  # a diagnostic: fp32 halves its O(out·in²) cost
    after = _solved_error(solution, rhs, damping, cross, yy)
    return LayerRecovery(layer, before, after, f"{int(fit.kept_in.sum())} of {fit.kept_in.numel()} inputs")


def solve_ridge(gram: torch.Tensor, cross: torch.Tensor, ridge: float, layer: str,
                prior: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``(G + λD)⁻¹ (C + λD P)`` by Cholesky, float64: least squares pulled toward ``prior`` (the
    layer's kept weights: a fit from little data then stays near weights that generalise, instead of
    shrinking toward zero; none: toward zero); ``λ = ridge · mean(diag G)`` (the bias row, last, is not
    damped). Where the factorisation fails, λ grows tenfold (from at least 1e-8) with a warning."""
    return _damped_solve(gram, cross, ridge, layer, prior)[0]


def _damped_solve(gram: torch.Tensor, cross: torch.Tensor, ridge: float, layer: str,
                  prior: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`solve_ridge`'s solution ``S``, with the right-hand side ``R`` it solved for and the
    damping ``λD`` it used: ``(G + λD) S = R`` (what :func:`_solved_error` needs)."""
    features = gram.shape[0] - 1
    scale = float(gram.diagonal()[:features].mean()) if features else 1.0
    damp = torch.ones(gram.shape[0], dtype=gram.dtype, device=gram.device)
    damp[-1] = 0.0
    lam = ridge * scale
    for attempt in range(12):
        damped = gram.clone()  # not gram + torch.diag(...): that builds a second n x n matrix
        damped.diagonal().add_(damp * lam)
        factor, info = torch.linalg.cholesky_ex(damped)
        del damped
        if int(info) == 0 and _well_conditioned(factor):
            if attempt:
                warnings.warn(f"reconstruct: the Gram matrix of layer {layer!r} is singular at ridge {ridge:g}; "
                              f"fell back to ridge {lam / max(scale, 1e-300):.3g}", RecoveryWarning, stacklevel=4)
            rhs = cross if prior is None else cross + (damp * lam).unsqueeze(1) * prior
            return torch.cholesky_solve(rhs, factor), rhs, damp * lam
        lam = max(lam * 10, 1e-8 * max(scale, 1e-300))
    raise CalibrationError(f"reconstruct: the Gram matrix of layer {layer!r} cannot be factorised even with "
                           f"ridge {lam / max(scale, 1e-300):.3g} (its inputs are all zero or non-finite?)")


def _well_conditioned(factor: torch.Tensor) -> bool:
    """A Cholesky factor whose smallest pivot is not lost in rounding (a rank-deficient Gram matrix
    often factorises "successfully" with pivots of order 1e-16 of the largest)."""
    pivots = factor.diagonal() ** 2
    return bool(pivots.min() > 1e-10 * pivots.max())


def relative_error(w: torch.Tensor, gram: torch.Tensor, cross: torch.Tensor, yy: float) -> float:
    """``‖W x̃ - y‖ / ‖y‖`` over every calibration row, from the moments alone (``W G Wᵀ`` in ``gram``'s
    dtype: O(out · in²))."""
    quadratic = float(((w.to(gram.dtype) @ gram) * w.to(gram.dtype)).sum(dtype=torch.float64))
    return _relative(quadratic, float((w * cross.T).sum()), yy)


def _solved_error(solution: torch.Tensor, rhs: torch.Tensor, damping: torch.Tensor, cross: torch.Tensor,
                  yy: float) -> float:
    """:func:`relative_error` of ``W = Sᵀ`` where ``(G + Λ) S = R``, in O(out · in): then
    ``tr(W G Wᵀ) = tr(Sᵀ R) - tr(Sᵀ Λ S)``, so the Gram matrix is not multiplied again."""
    quadratic = float((solution * rhs).sum() - (solution * solution * damping.unsqueeze(1)).sum())
    return _relative(quadratic, float((solution * cross).sum()), yy)


def _relative(quadratic: float, linear: float, yy: float) -> float:
    """``sqrt((tr(W G Wᵀ) - 2 tr(W C) + yᵀy) / yᵀy)``: the relative residual from its three moments."""
    err = quadratic - 2 * linear + yy
    return math.sqrt(max(err, 0.0) / yy) if yy > 0 else 0.0


# --- the table of steps -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class RecoveryStep:
    """One recovery step, declared once.

    >>> RECOVERY_STEPS["recalibrate-batchnorm"].aliases
    ('batchnorm', 'bn')
    """

    name: str
    """What ``recover=`` and a pipeline spec call it (the recovery pass of the same name runs it)."""
    run: Callable[..., tuple[fx.GraphModule, RecoveryReport]]
    """``(analysis, drop, pruned, calibration, progress, **options) -> (new GraphModule, report)``;
    ``options`` are the pass's fields (``reconstruct``'s ``ridge``)."""
    doc: str
    """One line for the docs."""
    needs_source: bool = True
    """Compares with the original model: needs its ``analysis`` and the dropped classes ``drop``."""
    aliases: tuple[str, ...] = ()
    """Short names ``recover=`` also accepts."""


def _run_compensate_bias(analysis: Analysis, drop: Dropped, pruned: fx.GraphModule, calibration: Any,
                         progress: bool = False) -> tuple[fx.GraphModule, RecoveryReport]:
    return compensate_bias(analysis, drop, pruned, calibration, progress)


def _run_reconstruct(analysis: Analysis, drop: Dropped, pruned: fx.GraphModule, calibration: Any,
                     progress: bool = False, ridge: float = 1e-3) -> tuple[fx.GraphModule, RecoveryReport]:
    return reconstruct(analysis, drop, pruned, calibration, ridge, progress)


def _run_recalibrate_batchnorm(analysis: Any, drop: Any, pruned: fx.GraphModule, calibration: Any,
                               progress: bool = False) -> tuple[fx.GraphModule, RecoveryReport]:
    return recalibrate_batchnorm(pruned, calibration, progress)


#: Every recovery step by name, in the order a user would usually run them.
RECOVERY_STEPS: dict[str, RecoveryStep] = {step.name: step for step in (
    RecoveryStep("compensate-bias", _run_compensate_bias, "dropped channels' mean contributions into the "
                 "consumers' biases", aliases=("bias",)),
    RecoveryStep("reconstruct", _run_reconstruct, "consumers of dropped channels refitted to the original's "
                 "outputs (ridge least squares)"),
    RecoveryStep("recalibrate-batchnorm", _run_recalibrate_batchnorm, "BatchNorm running statistics "
                 "re-measured on the pruned model", needs_source=False, aliases=("batchnorm", "bn")),
)}
_BY_ALIAS = {alias: step.name for step in RECOVERY_STEPS.values() for alias in step.aliases}


def recovery_steps(recover: Any) -> tuple[str, ...]:
    """``recover=`` (a name or names; short names allowed) as canonical step names.

    >>> recovery_steps(("reconstruct", "bn"))
    ('reconstruct', 'recalibrate-batchnorm')
    """
    items = (recover,) if isinstance(recover, str) else tuple(recover or ())
    steps = []
    for item in items:
        name = _BY_ALIAS.get(item, item) if isinstance(item, str) else item
        if name not in RECOVERY_STEPS:
            raise InvalidOptionError(f"unknown recovery step {item!r} in recover=; expected some of "
                                     f"{list(RECOVERY_STEPS)} (or {', '.join(map(repr, _BY_ALIAS))})")
        steps.append(name)
    return tuple(steps)


def recover(analysis: Analysis, drop: Dropped, pruned: fx.GraphModule, calibration: Any,
            steps: Sequence[str], progress: bool = False) -> tuple[fx.GraphModule, tuple[RecoveryReport, ...]]:
    """Run the recovery ``steps`` in order on ``pruned`` (each on the previous one's output), each
    with its default options.

    >>> gm, reports = recover(result.analysis, result.drop, result.graph_module, loader,
    ...                       ["reconstruct"])                                   # doctest: +SKIP
    """
    reports = []
    for name in recovery_steps(steps):
        pruned, report = RECOVERY_STEPS[name].run(analysis, drop, pruned, calibration, progress)
        reports.append(report)
    return pruned, tuple(reports)
