"""Verify: the pruned model must equal the original with every dropped channel contributing nothing.

The reference is built from the *original* graph, not the pruned one: every consumer that contracts over
channels gets its dropped inputs zeroed — parameter consumers (conv/linear input columns, RNN recurrent
columns) by zeroing those weight slices, activation contractions (``q @ k``, ``sum``) by a mask multiplied
into the graph — and every normalisation computes its statistics over the kept positions only: each site
the rules recorded (``analysis.norm_sites``: LayerNorm, RMSNorm, GroupNorm, ``F.normalize``, a mean or
variance over a pruned dim — at the export level HF's RMSNorm is ``pow``/``mean``/``rsqrt`` and its
``mean`` is the site) is replaced by its kept-only counterpart (:mod:`fxprune.core.kept_norms`). The pruned
model must equal that reference to float tolerance, for every model. Both run in eval mode with the
observers of fake-quantizers frozen and their rounding off: rounding to a grid would turn float
summation-order noise (a pruned conv sums fewer terms) into whole quantization steps. Every quantizer's
state (scale, zero point, observed range) must instead equal the original's at the kept indices.

Beside the verdict the report gives the *drift*: how far the pruned outputs are from the unmasked
original's — what pruning changed, for information. ``exact`` says whether the reference is the plain
zeroed-channel original (True) or also recomputed some statistic over kept positions (False: a dropped
channel reached a LayerNorm-family statistic or an activation fake-quantizer's range); either way
``passed`` holds only when the pruned model equals the reference.

>>> report = fxprune.verify(model, result, (x,))      # doctest: +SKIP
>>> print(report)                                    # doctest: +SKIP
verify passed: max abs error 2.4e-07 (approximate, tol 0.0001); drift from the original 0.31 (rel 0.052)
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Optional, Sequence

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from fxprune.core.channels import Dropped
from fxprune.core.analysis import Analysis
from fxprune.errors import VerificationError
from fxprune.core.graph import MaskSite, insert_masks, meta_value
from fxprune.core.opcall import NormSite
from fxprune.core.predicates import is_quantizer
from fxprune.core.rewrite import Pruning, build_graph_module


@dataclass(frozen=True)
class VerifyReport:
    """The outcome of :func:`verify`."""

    max_abs_error: float
    """Largest absolute difference between the pruned outputs and the reference's."""
    max_rel_error: float
    """``max_abs_error`` over the reference outputs' largest magnitude."""
    exact: bool
    """True when the reference is the plain zeroed-channel original; False when it also recomputes some
    statistic over the kept positions (a dropped channel reaches a LayerNorm-family norm, a mean over
    channels, an activation fake-quantizer's range; or, with ``propagate_bias``, a padded consumer the
    folded constant cannot reach exactly). ``passed`` is checked against the reference either way."""
    passed: bool
    """The pruned model equals the reference to ``tolerance`` (relative or absolute)."""
    tolerance: float
    max_abs_drift: float = 0.0
    """Information: largest absolute difference from the unmasked original's outputs."""
    max_rel_drift: float = 0.0
    """``max_abs_drift`` over the original outputs' largest magnitude."""
    quantizer_mismatch: str = ""
    """A fake-quantizer whose state is not the original's sliced per the plan (then ``passed`` is False);
    the outputs are compared with fake quantization off (see :func:`eval_copy`)."""
    other_sizes: str = ""
    """Where the graph accepts another batch size (and sequence length): what went wrong there -- the
    captured graph differs from the model (a forward that branches on the batch size), or the pruned
    graph from its reference (then ``passed`` is False). Empty when both agree or the shapes are static."""
    non_finite: tuple[str, ...] = ()
    """The original's tensors that hold NaN or infinite values: their scores, and the pruned model, mean
    nothing (pruning still ran and was warned about)."""

    def __str__(self) -> str:
        kind = "exact" if self.exact else "approximate"
        verdict = "passed" if self.passed else "FAILED"
        quantizers = f"; {self.quantizer_mismatch}" if self.quantizer_mismatch else ""
        quantizers += f"; {self.other_sizes}" if self.other_sizes else ""
        quantizers += (f"; note: {len(self.non_finite)} tensors of the original hold NaN or infinite values "
                       f"({', '.join(self.non_finite[:3])})") if self.non_finite else ""
        return (f"verify {verdict}: max abs error {self.max_abs_error:.3g} ({kind}, tol {self.tolerance:g}); "
                f"drift from the original {self.max_abs_drift:.3g} (rel {self.max_rel_drift:.3g}){quantizers}")


def reference_model(analysis: Analysis, drop: Dropped,
                    replaced: Optional[dict[str, torch.Tensor]] = None) -> fx.GraphModule:
    """The original graph with every dropped channel's consumer inputs zeroed and every normalisation's
    statistics over kept positions only; ``replaced`` swaps in other tensors (folded biases)."""
    pruning = Pruning(analysis, drop)
    zeroed = {**_zeroed_params(analysis, pruning), **(replaced or {})}
    graph = copy.deepcopy(analysis.gm.graph)
    items = reference_items(analysis.gm, graph, zeroed)
    gm = build_graph_module(analysis.gm, graph, items)
    insert_masks(gm, list(act_mask_sites(analysis, pruning)), analysis.level)
    kept_statistics(gm, analysis, pruning)
    return gm


def kept_statistics(gm: fx.GraphModule, analysis: Analysis, pruning: Pruning) -> None:
    """Replace, in ``gm`` (a copy of ``analysis.gm``), every norm site that sees a dropped position by
    its kept-only counterpart (in place: ``gm`` is the reference being built)."""
    nodes = {n.name: n for n in gm.graph.nodes}
    for i, site in enumerate(analysis.norm_sites):
        keep = _keep_mask(site, pruning)
        if keep is None:
            continue
        node, name = nodes[site.node], f"_fxprune_keep_{i}"
        gm.register_buffer(name, keep)
        with gm.graph.inserting_before(node):
            args = [_reference_arg(gm, nodes, a) for a in site.args]
            kept = gm.graph.call_function(site.kept_only, (args[0], gm.graph.get_attr(name), *args[1:]))
        node.replace_all_uses_with(kept)
        gm.graph.erase_node(node)
        nodes[site.node] = kept  # a later site may read this one's output (a norm of a norm's output)
    gm.recompile()


def _keep_mask(site: NormSite, pruning: Pruning) -> Optional[torch.Tensor]:
    """1 at kept, 0 at dropped positions of the site's dims, broadcastable to ``x`` (None: all kept)."""
    masks = [pruning.kept(ids) for ids in site.ids]
    if all(bool(m.all()) for m in masks):
        return None
    like = meta_value(site.args[0])
    keep = torch.ones([1] * len(like.shape), dtype=like.dtype, device=like.device)
    for dim, mask in zip(site.dims, masks):
        shape = [1] * len(like.shape)
        shape[dim] = -1
        keep = keep * mask.view(shape).to(like.dtype).to(like.device)
    return keep


def _reference_arg(gm: fx.GraphModule, nodes: dict[str, fx.Node], value: Any) -> Any:
    """A site's argument in the reference graph: its node there, or a parameter named by its key."""
    if isinstance(value, str):
        return gm.graph.get_attr(value)
    return fx.node.map_arg(value, lambda n: nodes[n.name])


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


def act_mask_sites(analysis: Analysis, pruning: Pruning) -> Iterator[MaskSite]:
    """A mask for every contraction (matmul, sum) that reads a dropped position of an activation."""
    for sink in analysis.act_sinks:
        keep = pruning.kept(sink.ids)
        if keep is not None and not bool(keep.all()):
            yield MaskSite(sink.node, sink.arg, sink.dim, keep)


def _outputs(model: torch.nn.Module, inputs: tuple) -> list[torch.Tensor]:
    with torch.no_grad():
        out = model(*inputs)
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def eval_copy(model: torch.nn.Module, rounding: bool = True) -> torch.nn.Module:
    """Running a training-mode model would update BatchNorm statistics, and running a prepared
    (observed) graph its observers' statistics, in any mode: run an eval copy instead, its
    fake-quantizers' observers frozen (each then applies its stored scale, as at inference).

    An exported (aten) graph ignores ``.eval()``: its ``batch_norm``/``dropout`` calls carry their
    training flag as an argument (a ``prepare_qat_pt2e`` graph is built in training mode). The copy gets
    the eval-mode calls instead (:func:`_eval_mode_ops`, what torchao's ``move_exported_model_to_eval``
    does): batch statistics over a verification batch of 2 divide by a near-zero std where the 2 samples
    nearly agree (layer4 of resnet18 at 32x32 is 1x1, so 2 values per channel), which turned float
    summation-order noise into errors of 1e-4..1e-3, and dropout would make both runs random.

    ``rounding=False`` also turns their rounding off (values pass through in float): rounding to a grid
    turns float summation-order differences (1e-7, a pruned conv sums fewer terms) into whole
    quantization steps that compound over layers, so verify compares the two models in float and
    checks the quantizers' state apart (:func:`quantizer_state_mismatch`)."""
    if not (model.training or any(is_quantizer(m) for m in model.modules()) or _training_ops(model)):
        return model
    frozen = copy.deepcopy(model)
    try:
        frozen.eval()
    except NotImplementedError:  # torch.export's module() refuses eval(): its ops carry the mode
        for module in frozen.modules():
            module.training = False
    _eval_mode_ops(frozen)
    for module in frozen.modules():
        if is_quantizer(module) and callable(getattr(module, "disable_observer", None)):
            module.disable_observer()
        if not rounding and is_quantizer(module) and callable(getattr(module, "disable_fake_quant", None)):
            module.disable_fake_quant()
    return frozen


_aten = torch.ops.aten
# aten ops whose training flag is an argument: the flag's position
_TRAINING_FLAG = {_aten.batch_norm.default: 5, _aten.native_batch_norm.default: 5,
                  _aten.dropout.default: 2, _aten.native_dropout.default: 2,
                  _aten.feature_dropout.default: 2, _aten.alpha_dropout.default: 2,
                  _aten.feature_alpha_dropout.default: 2}
# training-mode overloads with an eval-mode twin of the same arguments and outputs
_EVAL_TWIN = {_aten._batch_norm_with_update.default: _aten._batch_norm_no_update.default}


def _training_ops(model: torch.nn.Module) -> list[fx.Node]:
    """The nodes of ``model``'s graphs (itself and GraphModule children) that run in training mode."""
    nodes = []
    for module in model.modules():
        if isinstance(module, fx.GraphModule):
            for node in module.graph.nodes:
                if node.op != "call_function":
                    continue
                flag = _TRAINING_FLAG.get(node.target)
                if node.target in _EVAL_TWIN or (
                        node.target == _aten._native_batch_norm_legit.default and node.args[5] is not False) or (
                        flag is not None and _flag(node, flag) is not False):
                    nodes.append(node)
    return nodes


def _flag(node: fx.Node, index: int) -> Any:
    return node.args[index] if len(node.args) > index else node.kwargs.get("train", node.kwargs.get("training"))


def _eval_mode_ops(model: torch.nn.Module) -> None:
    """Switch the training-mode aten calls of ``model``'s graphs (a copy) to their eval-mode form."""
    owners = set()
    for node in _training_ops(model):
        owners.add(node.graph.owning_module)
        if node.target in _EVAL_TWIN:
            node.target = _EVAL_TWIN[node.target]
        elif node.target == _aten._native_batch_norm_legit.default:
            # (x, w, b, mean, var, training, momentum, eps) -> no_training(x, w, b, mean, var, momentum, eps)
            node.target = _aten._native_batch_norm_legit_no_training.default
            node.args = node.args[:5] + node.args[6:]
        else:
            index = _TRAINING_FLAG[node.target]
            if len(node.args) > index:
                node.args = node.args[:index] + (False,) + node.args[index + 1:]
            else:
                node.kwargs = {**node.kwargs, **{k: False for k in ("train", "training") if k in node.kwargs}}
    for gm in owners:
        if gm is not None:
            gm.recompile()


def quantizer_state_mismatch(original: torch.nn.Module, pruned: torch.nn.Module,
                             kept_indices: Mapping[str, Mapping[int, Sequence[int]]]) -> str:
    """The first fake-quantizer or observer tensor of ``pruned`` that is not the original's at the
    plan's kept indices (scales, zero points, observed ranges), or ``""``: the quantization the float
    comparison does not exercise is checked exactly here."""
    state = dict(original.state_dict())
    for name, module in pruned.named_modules():
        if not is_quantizer(module):
            continue
        for key, tensor in module.state_dict().items():
            full = f"{name}.{key}"
            if full not in state:
                continue
            expected = state[full]
            for dim, index in sorted(kept_indices.get(full, {}).items()):
                expected = expected.index_select(int(dim), torch.tensor(list(index), dtype=torch.long))
            if expected.shape != tensor.shape or not torch.equal(expected, tensor):
                return f"{full} is not the original's at the kept indices"
    return ""


def output_masks(analysis: Analysis, drop: Dropped) -> list[list[Optional[torch.Tensor]]]:
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
            masks: Optional[list[list[Optional[torch.Tensor]]]] = None,
            original: Optional[torch.nn.Module] = None) -> VerifyReport:
    """Run both models; ``masks`` select the reference outputs' kept positions (pruned outputs);
    ``original`` (the unmasked model) gives the drift, for information."""
    ref_out = _kept_outputs(reference, inputs, masks)
    new_out = _outputs(eval_copy(pruned, rounding=False), inputs)
    if len(ref_out) != len(new_out) or any(a.shape != b.shape for a, b in zip(ref_out, new_out)):
        raise VerificationError(f"pruned outputs have shapes {[tuple(t.shape) for t in new_out]}, "
                                f"expected {[tuple(t.shape) for t in ref_out]}")
    if not any(t.numel() for t in ref_out):  # an empty batch compares nothing: it cannot pass
        raise VerificationError(f"the outputs have no elements ({[tuple(t.shape) for t in ref_out]}): verify "
                                f"needs example inputs with at least one row")
    abs_err, rel = _difference(ref_out, new_out)
    tol = tolerance if tolerance is not None else _default_tolerance(ref_out)
    drift = _difference(_kept_outputs(original, inputs, masks), new_out) if original is not None else (0.0, 0.0)
    passed = rel <= tol or abs_err <= tol
    return VerifyReport(abs_err, rel, exact, passed, tol, *drift)


def check_same_model(model: Any, original: torch.nn.Module, inputs: tuple,
                     tolerance: Optional[float] = None) -> None:
    """``verify(model, result)`` compares against ``result``'s own capture of the original; ``model`` must be
    that model (the same outputs on ``inputs``), or the verdict would be about another one.

    >>> check_same_model(torchvision.models.resnet34(), result.analysis.gm, (x,))  # doctest: +SKIP
    Traceback (most recent call last):
    fxprune.errors.PlanMismatchError: verify's model is not the model the result was pruned from: ...
    """
    from fxprune.errors import InvalidOptionError, PlanMismatchError
    if isinstance(model, torch.export.ExportedProgram):
        model = model.module()
    if not isinstance(model, torch.nn.Module):
        raise InvalidOptionError(f"verify(model, result) needs the original model (an nn.Module, GraphModule "
                                 f"or ExportedProgram), got {type(model).__name__}")
    try:
        given, captured = _outputs(eval_copy(model, rounding=False), inputs), _outputs(eval_copy(original, rounding=False), inputs)
    except Exception as exc:  # another model that rejects the result's inputs
        raise PlanMismatchError(f"verify's model is not the model the result was pruned from: it fails on "
                                f"the example inputs ({type(exc).__name__}: {str(exc)[:200]})") from exc
    shapes = [tuple(t.shape) for t in given], [tuple(t.shape) for t in captured]
    if shapes[0] != shapes[1]:
        raise PlanMismatchError(f"verify's model is not the model the result was pruned from: its outputs "
                                f"have shapes {shapes[0]}, the original's {shapes[1]}")
    captured, given = _nan_where_both(captured, given)  # NaN weights give NaN at the same places
    abs_err, rel = _difference(captured, given)
    tol = tolerance if tolerance is not None else _default_tolerance(captured)
    if not (rel <= tol or abs_err <= tol):
        raise PlanMismatchError(f"verify's model is not the model the result was pruned from: its outputs "
                                f"differ from the original's by {abs_err:.3g} (rel {rel:.3g})")


def other_sizes(inputs: tuple) -> Optional[tuple]:
    """The example inputs at a second batch size (1, or 3 for a batch of 1) and, for token ids (2-D
    integer inputs), a second sequence length; None when no input has a batch dim."""
    if not any(isinstance(x, torch.Tensor) and x.dim() for x in inputs):
        return None
    return tuple(_resized(x) if isinstance(x, torch.Tensor) and x.dim() else x for x in inputs)


def _resized(x: torch.Tensor) -> torch.Tensor:
    x = x[:1] if x.shape[0] > 1 else torch.cat([x, x, x])
    tokens = x.dim() == 2 and not x.is_floating_point() and not x.is_complex()
    if tokens:
        x = x[:, :-1] if x.shape[1] > 1 else torch.cat([x, x], dim=1)
    return x


def check_other_sizes(model: Any, original: torch.nn.Module, reference: torch.nn.Module,
                      pruned: torch.nn.Module, inputs: tuple, tolerance: Optional[float],
                      masks: Any = None) -> str:
    """Where the captured graph runs at :func:`other_sizes`, the user's model must agree with it there
    (a forward that branches on the batch size exports one branch, right only at the example's batch)
    and the pruned graph with its reference; returns what differs, or ``""``."""
    other = other_sizes(inputs)
    try:
        captured = _outputs(eval_copy(original, rounding=False), other) if other is not None else None
    except Exception:  # static shapes: the graph guards its input sizes; nothing to check
        return ""
    if captured is None or not any(t.numel() for t in captured):
        return ""
    shapes = [tuple(x.shape) for x in other if isinstance(x, torch.Tensor)]
    model = model.module() if isinstance(model, torch.export.ExportedProgram) else model
    try:
        given = _outputs(eval_copy(model, rounding=False), other)
    except Exception as exc:
        return f"the model fails at input shapes {shapes}, which the graph accepts ({type(exc).__name__})"
    tol = tolerance if tolerance is not None else _default_tolerance(captured)
    if [t.shape for t in given] != [t.shape for t in captured] or min(_difference(captured, given)) > tol:
        return (f"at input shapes {shapes} the captured graph differs from the model (does the forward "
                f"depend on the batch size? capture with dynamic_shapes=None)")
    try:
        report = compare(reference, pruned, other, True, tolerance, masks)
    except Exception as exc:  # fails or gives other shapes there: a failed verify, said
        return f"at input shapes {shapes} the pruned graph fails: {type(exc).__name__}: {str(exc)[:160]}"
    return "" if report.passed else f"at input shapes {shapes} the pruned graph differs from its " \
                                    f"reference by {report.max_abs_error:.3g}"


def _kept_outputs(model: torch.nn.Module, inputs: tuple,
                  masks: Optional[list[list[Optional[torch.Tensor]]]]) -> list[torch.Tensor]:
    out = _outputs(eval_copy(model, rounding=False), inputs)
    if masks is not None and len(masks) == len(out):
        out = [_keep(t, m) for t, m in zip(out, masks)]
    return out


def _nan_where_both(a: list[torch.Tensor], b: list[torch.Tensor]) -> tuple[list, list]:
    """Both lists with zeros where both tensors hold NaN (the same model run twice), NaN left elsewhere."""
    both = [x.isnan() & y.isnan() if x.is_floating_point() and x.shape == y.shape else None for x, y in zip(a, b)]

    def clear(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        return [t if m is None else t.masked_fill(m, 0.0) for t, m in zip(tensors, both)]

    return clear(a), clear(b)


def _difference(expected: list[torch.Tensor], actual: list[torch.Tensor]) -> tuple[float, float]:
    """(max abs difference, that over the expected outputs' largest magnitude); NaN is never small."""
    pairs = [(a.double(), b.double()) for a, b in zip(expected, actual) if a.numel() and a.shape == b.shape]
    abs_err = max((float((a - b).abs().nan_to_num(float("inf")).max()) for a, b in pairs), default=0.0)
    scale = max((float(a.abs().max()) for a, _ in pairs), default=0.0)
    return abs_err, abs_err / max(scale, 1e-12)


def _default_tolerance(outputs: list[torch.Tensor]) -> float:
    low = any(t.dtype in (torch.float16, torch.bfloat16) for t in outputs)
    return 2e-2 if low else 1e-4
