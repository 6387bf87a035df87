"""Capture: a model and example inputs become a GraphModule with a traced value on every node.

``"fx"`` uses ``torch.fx.symbolic_trace`` (layers stay ``call_module`` nodes, readable code, what
``prepare_fx`` consumes; transformer layers are traced into, see :class:`_Tracer`); ``"export"`` uses
``torch.export.export(...).module()`` (ATen ops, parameters as ``get_attr``, literal sizes in the graph).
Values come from a run on the ``meta`` device (see :func:`propagate_values`), or are the fake values a
fresh ``torch.export`` graph already carries. A GraphModule or ExportedProgram is used as it is, at its
own level.

At the export level the result is not specialised to the example's sizes: by default the batch dim of
every tensor input, and the sequence dim of token inputs (integer tensors of 2 dims), are exported as
dynamic (see :func:`default_dynamic_shapes`); ``dynamic_shapes=`` passes the user's own spec to
``torch.export``, ``None`` exports static shapes. An ExportedProgram keeps its own.
"""
from __future__ import annotations

import copy
import functools
import inspect
import re
import traceback
import warnings
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
import torch.fx as fx
import operator

import torch.nn as nn
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp
from torch.nn.utils.weight_norm import WeightNorm  # the class (torch.nn.utils.weight_norm is a function)

from fxprune.options import CAPTURES
from fxprune.core.graph import copy_graph_module
from fxprune.errors import (CaptureError, DynamicShapesError, ExampleInputError, InvalidOptionError,
                     PrunedGraphError, TrainingModeError, UnsupportedModelError)

_BATCH_NORMS = (torch.nn.modules.batchnorm._BatchNorm,)
AUTO = "auto"
"""``dynamic_shapes`` default: a dynamic batch (and sequence for token inputs), see
:func:`default_dynamic_shapes`."""


@dataclass(frozen=True)
class Captured:
    """A graph ready for analysis: its own copy of the graph, the input's tensors shared read-only."""

    gm: fx.GraphModule
    level: str
    example_inputs: tuple


def as_inputs(example_inputs: Any) -> tuple:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (list, tuple)):
        return tuple(example_inputs)
    raise ExampleInputError(f"example_inputs must be a tensor or a tuple of tensors, got "
                            f"{type(example_inputs).__name__}")


def check_nonempty(inputs: tuple) -> tuple:
    """Example inputs with no elements would run every op on nothing and verify nothing: refused."""
    for i, x in enumerate(inputs):
        if isinstance(x, torch.Tensor) and x.numel() == 0:
            raise ExampleInputError(f"example input {i} has shape {tuple(x.shape)} (no elements): pass at "
                                    f"least one row")
    return inputs


def refuse_meta(model: torch.nn.Module) -> None:
    """A model on the meta device has shapes but no values: nothing to score, verify or save."""
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_meta:
            raise UnsupportedModelError(f"tensor {name!r} is on the meta device (no data): load the weights "
                                        f"first (e.g. load_state_dict(..., assign=True) or .to_empty())")


def check_input_count(gm: fx.GraphModule, inputs: tuple) -> None:
    """More example inputs than the graph's placeholders would fail later, in verify: refused here."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if any("*" in str(n.target) or n.target.startswith("*") for n in placeholders):
        return  # *args: any count
    if len(inputs) > len(placeholders):
        raise ExampleInputError(f"{len(inputs)} example inputs given; the model's forward takes "
                                f"{len(placeholders)} ({', '.join(str(n.target) for n in placeholders)})")


def non_finite_tensors(gm: torch.nn.Module) -> list[str]:
    """The tensors of ``gm`` that hold NaN or infinite values."""
    return [name for name, t in gm.state_dict().items()
            if t.is_floating_point() and not t.is_meta and not bool(torch.isfinite(t).all())]


def warn_non_finite(gm: fx.GraphModule) -> None:
    """NaN or infinite weights prune (their scores are NaN or inf) but the result means nothing: said
    here, and in the verify report (:class:`~fxprune.core.verify.VerifyReport.non_finite`)."""
    bad = non_finite_tensors(gm)
    if bad:
        warnings.warn(f"{len(bad)} tensors hold NaN or infinite values ({', '.join(bad[:3])}); their channels' "
                      f"scores, and the pruned model, are not meaningful", stacklevel=3)


def capture(model: Any, example_inputs: Any, level: str = "fx", dynamic_shapes: Any = AUTO) -> Captured:
    """Trace ``model`` at ``level`` and propagate fake values through every node.

    ``dynamic_shapes`` (export level): ``"auto"`` (a dynamic batch, and sequence for token inputs),
    ``None`` (static), or a spec for ``torch.export.export``.

    >>> cap = capture(torchvision.models.resnet18().eval(), torch.randn(1, 3, 64, 64))  # doctest: +SKIP
    >>> cap.level, cap.gm.graph.find_nodes(op="call_module")[0].target              # doctest: +SKIP
    ('fx', 'conv1')
    """
    inputs = check_nonempty(as_inputs(example_inputs))
    if isinstance(model, torch.export.ExportedProgram):
        gm, level = model.module(), "export"
    elif isinstance(model, fx.GraphModule):
        gm, level = copy_graph_module(model), graph_level(model)
    elif isinstance(model, torch.nn.Module):
        refuse_meta(model)
        gm = _trace(model, inputs, level, dynamic_shapes)
        check_input_count(gm, inputs)
        if _export_values_complete(gm):  # torch.export just traced fake values on every node: reuse them
            refuse_quantized(gm)
            warn_non_finite(gm)
            return Captured(gm, level, inputs)
    else:
        raise UnsupportedModelError(f"expected an nn.Module, GraphModule or ExportedProgram, got "
                                    f"{type(model).__name__}")
    refuse_quantized(gm)
    warn_non_finite(gm)
    _mark_dynamic_dims(gm)
    propagate_values(gm, inputs)
    return Captured(gm, level, inputs)


#: ``placeholder.meta`` key: the dims torch.export traced as symbolic, kept when concrete values are
#: propagated for the rules (calibration batches may then have any size along them).
DYNAMIC_DIMS = "fxprune_dynamic_dims"


def _mark_dynamic_dims(gm: fx.GraphModule) -> None:
    for node in gm.graph.find_nodes(op="placeholder"):
        shape = getattr(node.meta.get("val"), "shape", None)
        if shape is not None and DYNAMIC_DIMS not in node.meta:
            node.meta[DYNAMIC_DIMS] = tuple(i for i, size in enumerate(shape) if not isinstance(size, int))


def _export_values_complete(gm: fx.GraphModule) -> bool:
    """True for a fresh ``torch.export`` graph whose nodes all carry export's fake values; its
    ``_guards_fn`` call (input checks, returns None) gets ``None`` as its value."""
    nodes = [n for n in gm.graph.nodes if n.op != "output"]
    if graph_level(gm) != "export" or _symbolic(nodes):  # rules read concrete sizes: propagate them
        return False
    for node in nodes:
        if "val" not in node.meta and not (node.op == "call_module" and node.target == "_guards_fn"):
            return False
    for node in nodes:
        node.meta.setdefault("val", None)
    return True


def _symbolic(nodes: list[fx.Node]) -> bool:
    for node in nodes:
        value = node.meta.get("val")
        if isinstance(value, torch.SymInt) or isinstance(value, torch.Tensor) and \
                any(isinstance(s, torch.SymInt) for s in value.shape):
            return True
    return False


def graph_level(gm: fx.GraphModule) -> str:
    """``"export"`` when the graph calls ATen overloads, else ``"fx"``."""
    for node in gm.graph.nodes:
        if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
            return "export"
    return "fx"


def _trace(model: torch.nn.Module, inputs: tuple, level: str, dynamic_shapes: Any = AUTO) -> fx.GraphModule:
    if level not in CAPTURES:
        raise InvalidOptionError(f"capture must be one of {CAPTURES}, got {level!r}")
    if level == "fx":
        try:
            gm = _symbolic_trace(model)
        except Exception as exc:  # any tracer failure: name the line, suggest export
            raise CaptureError(_trace_failure(exc, "torch.fx.symbolic_trace", "export")) from exc
        gm.training = model.training
        _refuse_lost_hooks(model, gm)
        return gm
    _refuse_training_batch_norm(model)
    gm = export(without_cache(model), inputs, dynamic_shapes).module()
    for module in gm.modules():  # export's module always says training=True; keep the model's mode
        module.training = model.training
    return gm


def without_cache(model: torch.nn.Module) -> torch.nn.Module:
    """A shallow copy of ``model`` whose ``forward`` passes ``use_cache=False`` where it takes that
    argument (a HF decoder): a KV cache in the outputs is an object export cannot return, and a fixed
    interface holding every key/value head. The model itself is not touched.

    >>> without_cache(llama).forward.keywords                              # doctest: +SKIP
    {'use_cache': False}
    """
    try:
        takes = "use_cache" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # a builtin forward without a signature
        takes = False
    if not takes:
        return model
    view = copy.copy(model)
    view.forward = functools.partial(type(model).forward, view, use_cache=False)
    return view


def export(model: torch.nn.Module, inputs: tuple, dynamic_shapes: Any = AUTO) -> torch.export.ExportedProgram:
    """``torch.export.export`` with fxprune's errors. The ``"auto"`` spec takes the range export suggests
    when it rejects one (a sequence bounded by a position table), else falls back, with a warning, to a
    dynamic batch alone and then to static shapes; a user's own spec that export rejects is an error."""
    if dynamic_shapes != AUTO:
        try:
            return _export(model, inputs, dynamic_shapes)
        except Exception as exc:
            if dynamic_shapes is None or not _is_shape_failure(exc):
                raise CaptureError(_trace_failure(exc, "torch.export.export", "fx")) from exc
            raise DynamicShapesError(_dynamic_failure(exc, dynamic_shapes)) from exc
    full = default_dynamic_shapes(inputs)
    attempts = [full] + ([_batch_only(full)] if _batch_only(full) is not None else []) + [None]
    for spec, fallback in zip(attempts, attempts[1:] + [None]):
        try:
            return _export(model, inputs, spec)
        except Exception as exc:  # what export rejects is dropped, with a warning; other failures raise
            # a model that rejects its example widened to a batch of 2 (an initial state of batch 1
            # beside it) has no dynamic dim there: the next attempt, as for a rejected dim
            widened = _widened(inputs, spec) is not inputs
            if spec is None or not (_is_shape_failure(exc) or widened):
                raise CaptureError(_trace_failure(exc, "torch.export.export", "fx")) from exc
            bounded = _suggested(spec, exc)  # export's own fix: a range (a position table's length)
            if bounded is not None:
                try:
                    return _export(model, inputs, bounded)
                except Exception:  # the range was not enough: fall back as below
                    pass
            kept = "only a dynamic batch" if fallback is not None else \
                f"only the example's sizes {[tuple(x.shape) for x in _tensors(inputs)]}"
            warnings.warn(f"torch.export rejected a dynamic {_dim_names(spec, exc)}, so the graph accepts "
                          f"{kept}: {_first_line(exc)}", stacklevel=4)
    raise AssertionError("unreachable: the static attempt returns or raises")


def _export(model: torch.nn.Module, inputs: tuple, spec: Any) -> torch.export.ExportedProgram:
    # export specialises a dynamic dim whose example size is 0 or 1 (its 0/1 rule): such a dim is traced
    # from the example repeated to 2 (a batch-1 example is what most users pass); the size-oblivious
    # mode covers what remains
    import torch.fx.experimental._config as fx_config
    inputs = _widened(inputs, spec)
    oblivious = spec is not None and any(s in (0, 1) for x in _tensors(inputs) for s in x.shape)
    with fx_config.patch(backed_size_oblivious=oblivious):
        return torch.export.export(model, inputs, dynamic_shapes=spec)


def _widened(inputs: tuple, spec: Any) -> tuple:
    """``inputs`` with every dynamic dim of size 1 repeated to 2 (a tuple spec, one entry per input).

    >>> _widened((torch.zeros(1, 3),), ({0: torch.export.Dim("batch")},))[0].shape  # doctest: +SKIP
    torch.Size([2, 3])
    """
    if not isinstance(spec, (tuple, list)) or len(spec) != len(inputs):
        return inputs
    widened = tuple(_repeat_dims(x, dims) for x, dims in zip(inputs, spec))
    return inputs if all(a is b for a, b in zip(widened, inputs)) else widened


def _repeat_dims(x: Any, dims: Any) -> Any:
    if not isinstance(x, torch.Tensor) or not isinstance(dims, dict):
        return x
    for d, dim in dims.items():
        if dim is not None and isinstance(d, int) and 0 <= d < x.dim() and x.shape[d] == 1:
            x = torch.cat([x, x], dim=d)
    return x


def default_dynamic_shapes(inputs: tuple) -> Any:
    """The default export spec: a dynamic batch on dim 0 of every tensor input (one ``Dim`` per distinct
    example batch size), and a dynamic sequence on dim 1 of every integer input of 2 dims (token ids,
    attention masks); ``None`` when no input is a tensor with a dim.

    >>> default_dynamic_shapes((torch.zeros(2, 8, dtype=torch.long),))   # doctest: +SKIP
    ({0: Dim('batch', min=1), 1: Dim('seq', min=1)},)
    """
    dims: dict[tuple[str, int], Any] = {}

    def dim(kind: str, size: int) -> Any:
        if (kind, size) not in dims:
            count = sum(k == kind for k, _ in dims)
            dims[kind, size] = torch.export.Dim(kind if count == 0 else f"{kind}{count}", min=1)
        return dims[kind, size]

    def spec_of(x: Any) -> Any:
        if not isinstance(x, torch.Tensor) or x.dim() == 0:
            return None
        spec = {0: dim("batch", int(x.shape[0]))}
        if x.dim() == 2 and not x.is_floating_point() and not x.is_complex():
            spec[1] = dim("seq", int(x.shape[1]))
        return spec

    spec = tuple(spec_of(x) for x in inputs)
    return spec if dims else None


_SUGGESTION = re.compile(r"(\w+) = Dim\('(\w+)'((?:, (?:min|max)=\d+)*)\)")


def _suggested(spec: Any, exc: Exception) -> Any:
    """The default spec with the ranges export suggests for its dims ("seq = Dim('seq', max=16)"), or
    None when it suggests none."""
    ranges = {}
    for name, _, bounds in _SUGGESTION.findall(str(exc)):
        values = dict(part.strip().split("=") for part in bounds.split(",") if part.strip())
        low, high = int(values.get("min", 1)), int(values["max"]) if "max" in values else None
        if high is not None and high <= low:  # a range of one size is a specialisation: fall back
            return None
        ranges[name] = torch.export.Dim(name, min=low, max=high)
    if not ranges:
        return None
    return tuple(None if s is None else {d: ranges.get(dim.__name__, dim) for d, dim in s.items()}
                 for s in spec)


def _batch_only(spec: Any) -> Any:
    """The default spec without its sequence dims (None when nothing would be left to try)."""
    if spec is None or not any(s is not None and 1 in s for s in spec):
        return None
    return tuple(None if s is None else {0: s[0]} for s in spec)


def _tensors(inputs: tuple) -> list[torch.Tensor]:
    return [x for x in inputs if isinstance(x, torch.Tensor)]


def _is_shape_failure(exc: Exception) -> bool:
    """A failure caused by the dynamic dims (a constraint violation, a dim specialised to a constant)."""
    text = f"{type(exc).__name__}: {exc}"
    if "data-dependent" in text:  # control flow on values: no shape spec helps
        return False
    return any(k in text for k in ("Constraints violated", "specialized", "dynamic_shapes", "dim hint",
                                   "ConstraintViolation", "inferred ranges"))


def _dim_names(spec: Any, exc: Exception) -> str:
    names = sorted({d.__name__ for d in _spec_dims(spec) if hasattr(d, "__name__")})
    named = [n for n in names if n in str(exc)]
    return "/".join(named or names) + " dim"


def _spec_dims(spec: Any) -> list:
    if isinstance(spec, dict):
        return [d for v in spec.values() for d in _spec_dims(v)]
    if isinstance(spec, (list, tuple)):
        return [d for v in spec for d in _spec_dims(v)]
    return [] if spec is None else [spec]


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _dynamic_failure(exc: Exception, spec: Any) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip().startswith("- ")]
    detail = " ".join(lines[:2]) or _first_line(exc)
    return (f"torch.export rejected dynamic_shapes for the {_dim_names(spec, exc)}: {detail[:400]} "
            f"Mark that dim static (or give it the range export suggests), or pass dynamic_shapes=None.")


def _symbolic_trace(model: torch.nn.Module) -> fx.GraphModule:
    """``torch.fx.symbolic_trace`` that also traces into nn.Transformer{Encoder,Decoder}[Layer]."""
    tracer = _Tracer()
    graph = tracer.trace(model)
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


class _Tracer(fx.Tracer):
    """fx's default tracer, except that transformer layers and stacks called without masks are traced
    into (plain fx keeps every ``torch.nn`` module a leaf, so a whole encoder would be one opaque call
    whose channels all freeze). Inside, their attention is an ``nn.MultiheadAttention`` leaf, their
    feed-forward ``nn.Linear`` leaves: the ordinary rules prune heads and hidden units.

    A layer's forward tests tensors in Python before its fused fast path; with the fast path switched
    off while it is traced, that test short-circuits and the graph records the plain path, which
    computes the same function. Stacks are traced as "each layer in turn, then the norm": their own
    forward measures the sequence (control flow fx cannot trace), which only matters with masks. Any
    mask, or an ``is_causal`` hint, keeps the module a leaf, as plain fx would.
    """

    def __init__(self) -> None:
        super().__init__()
        self._through: set[int] = set()

    def is_leaf_module(self, m: torch.nn.Module, module_qualified_name: str) -> bool:
        return id(m) not in self._through and super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: torch.nn.Module, forward: Any, args: tuple, kwargs: dict) -> Any:
        sequences = _TRANSFORMER_SEQUENCES.get(type(m))
        if sequences is None or not _without_masks(sequences, args, kwargs):
            return super().call_module(m, forward, args, kwargs)
        if type(m) in _TRANSFORMER_STACKS:
            forward = functools.partial(_TRANSFORMER_STACKS[type(m)], m)
        self._through.add(id(m))
        fast_path = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            return super().call_module(m, forward, args, kwargs)
        finally:
            torch.backends.mha.set_fastpath_enabled(fast_path)
            self._through.discard(id(m))


def _without_masks(sequences: int, args: tuple, kwargs: dict) -> bool:
    """Only the sequences (src; or tgt and memory) are given: every mask is None, every hint falsy."""
    rest = list(args[sequences:]) + [v for k, v in kwargs.items() if k not in ("src", "tgt", "memory")]
    return all(v is None or v is False for v in rest)


def _encoder_stack(stack: nn.TransformerEncoder, src: Any, *_: Any, **__: Any) -> Any:
    for layer in stack.layers:
        src = layer(src)
    return stack.norm(src) if stack.norm is not None else src


def _decoder_stack(stack: nn.TransformerDecoder, tgt: Any, memory: Any, *_: Any, **__: Any) -> Any:
    for layer in stack.layers:
        tgt = layer(tgt, memory)
    return stack.norm(tgt) if stack.norm is not None else tgt


#: How many leading arguments are sequences (the rest are masks and hints).
_TRANSFORMER_SEQUENCES = {nn.TransformerEncoderLayer: 1, nn.TransformerEncoder: 1,
                          nn.TransformerDecoderLayer: 2, nn.TransformerDecoder: 2}
_TRANSFORMER_STACKS = {nn.TransformerEncoder: _encoder_stack, nn.TransformerDecoder: _decoder_stack}


def _trace_failure(exc: Exception, tracer: str, other: str) -> str:
    line = _user_line(exc)
    where = f" at {line}" if line else ""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return (f"{tracer} could not capture the model{where}: {type(exc).__name__}: {first}. "
            f"Try capture={other!r}.")


def _user_line(exc: Exception) -> str:
    """The innermost frame outside torch: the user's line that broke tracing."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if "/torch/" not in f.filename and "/fxprune/" not in f.filename]
    if not frames:
        return ""
    f = frames[-1]
    return f"{f.filename}:{f.lineno} `{(f.line or '').strip()}`"


def _refuse_lost_hooks(model: torch.nn.Module, gm: fx.GraphModule) -> None:
    """symbolic_trace calls a traced-through module's ``forward``, not its hooks, so the graph would
    compute something else; a parametrized layer (weight_norm, spectral_norm) or the old hook-based
    weight_norm cannot be copied into the result. (A leaf with hooks keeps them: analysis freezes it.)"""
    leaves = {str(n.target) for n in gm.graph.nodes if n.op == "call_module"}
    for name, module in model.named_modules():
        if torch.nn.utils.parametrize.is_parametrized(module):
            raise UnsupportedModelError(
                f"module {name!r} ({type(module).__name__}) has parametrizations "
                f"{sorted(module.parametrizations.keys())}: remove them first "
                f"(torch.nn.utils.parametrize.remove_parametrizations), or use capture='export', which "
                f"keeps them and leaves those channels unpruned")
        if any(isinstance(h, WeightNorm) for h in module._forward_pre_hooks.values()):
            raise UnsupportedModelError(
                f"module {name!r} ({type(module).__name__}) uses the hook-based torch.nn.utils.weight_norm, "
                f"whose computed weight cannot be copied: call torch.nn.utils.remove_weight_norm on it "
                f"first, or use capture='export'")
        if has_hooks(module) and name not in leaves:
            raise UnsupportedModelError(
                f"module {name or type(module).__name__!r} has forward hooks that torch.fx.symbolic_trace "
                f"drops when it traces through the module: remove them, or use capture='export', which "
                f"runs them")


def has_hooks(module: torch.nn.Module) -> bool:
    """Whether a module runs forward hooks (fx keeps them on a leaf; analysis cannot see into them)."""
    return bool(module._forward_hooks or module._forward_pre_hooks)


def _refuse_training_batch_norm(model: torch.nn.Module) -> None:
    for name, module in model.named_modules():
        if isinstance(module, _BATCH_NORMS) and module.training:
            raise TrainingModeError(
                f"BatchNorm {name!r} is in training mode: export would bake batch statistics and "
                f"running-stat updates into the graph. Call model.eval() before pruning at the export "
                f"level (the fx level prunes a training-mode model as it is).")


def refuse_quantized(gm: fx.GraphModule) -> None:
    """An already-converted int8 graph has packed weights fxprune cannot slice."""
    for name, module in gm.named_modules():
        if type(module).__module__.startswith(("torch.ao.nn.quantized", "torch.ao.nn.intrinsic.quantized")):
            raise UnsupportedModelError(
                f"module {name!r} ({type(module).__name__}) is already quantized (converted to int8); "
                f"prune the float model, or a prepared (observed/fake-quant) graph, before convert")
    for node in gm.graph.nodes:
        if node.op == "call_function" and "quantize_per" in str(node.target) and \
                "fake" not in str(node.target):
            raise UnsupportedModelError(
                f"node {node.name!r} ({node.target}) quantizes tensors: the graph is already converted "
                f"to int8; prune before convert")


def propagate_values(gm: fx.GraphModule, inputs: Sequence, rewritten: bool = False) -> None:
    """Record a fake value (shape, dtype, device) on every node: ``node.meta['val']``.

    A graph that fails raises :class:`ExampleInputError`, or :class:`PrunedGraphError` when it is
    fxprune's own output (``rewritten``: the original ran on these inputs); both name the node.

    First choice: run the graph on the ``meta`` device — shape functions only, no FLOPs, no activation
    memory, and modules are called as shallow copies holding meta parameters, so nothing of the input
    (BatchNorm statistics included) can change. Graphs that build real tensors inside or need data
    (``.item()``) fall back to one ``no_grad`` run for real (eval mode) or fake tensors (training mode,
    where a real forward would update BatchNorm statistics).
    """
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    try:
        _MetaValues(gm, mode, _device_of(gm, inputs)).run(*[_to_meta(x) for x in inputs])
        return
    except Exception:  # an op without a meta kernel, or data-dependent: use a slower exact route
        pass
    interpreter: Any = None
    try:
        if _is_training(gm):
            fake_inputs = [mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for x in inputs]
            interpreter = _FakeEvalProp(gm, mode)
            interpreter.propagate_dont_convert_inputs(*fake_inputs)
        else:
            interpreter = _RecordValues(gm, mode)
            with torch.no_grad():
                interpreter.run(*inputs)
    except Exception as exc:
        raise _run_failure(exc, inputs, getattr(interpreter, "failed", None), rewritten) from exc


def _run_failure(exc: Exception, inputs: Sequence, node: Optional[fx.Node], rewritten: bool) -> Exception:
    shapes = [tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__ for x in inputs]
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    at = f" at node {node.name!r} ({_target_name(node)})" if node is not None else ""
    if rewritten:
        return PrunedGraphError(f"the pruned graph fails{at} on example inputs of shapes {shapes} that the "
                                f"original ran: {type(exc).__name__}: {message}. This is a bug in fxprune's "
                                f"rules, not in the model or its inputs; please report it")
    return ExampleInputError(f"the model rejects example inputs of shapes {shapes}{at}: "
                             f"{type(exc).__name__}: {message}")


def _target_name(node: fx.Node) -> str:
    if node.op == "call_module":
        return f"module {node.target!r}"
    if node.op == "call_method":
        return f"method .{node.target}()"
    return getattr(node.target, "__name__", None) or str(node.target)


class _NamesFailure:
    """Interpreter mixin: remembers the node that raised, for the error message."""

    failed: Optional[fx.Node] = None

    def run_node(self, n: fx.Node) -> Any:
        try:
            return super().run_node(n)  # type: ignore[misc]
        except Exception:
            self.failed = n
            raise


def _to_meta(value: Any) -> Any:
    if isinstance(value, torch.nn.Parameter):
        return torch.nn.Parameter(value.to("meta"), value.requires_grad)
    return value.to("meta") if isinstance(value, torch.Tensor) else value


def _device_of(gm: fx.GraphModule, inputs: Sequence) -> torch.device:
    for x in list(inputs) + list(gm.parameters()):
        if isinstance(x, torch.Tensor):
            return x.device
    return torch.device("cpu")


class MutableArgs:
    """Interpreter mixin: ops get plain lists and dicts, as the generated code gives them. fx keeps node
    arguments immutable, and some functions edit a list they are given (torchvision's 3-D shifted window
    attention pads its ``window_size`` list in place)."""

    def fetch_args_kwargs_from_env(self, n: fx.Node) -> tuple:
        args, kwargs = super().fetch_args_kwargs_from_env(n)  # type: ignore[misc]
        return _mutable(args), _mutable(kwargs)


def _mutable(value: Any) -> Any:
    if isinstance(value, list):  # fx's immutable_list is a list
        return [_mutable(v) for v in value]
    if type(value) is tuple:  # not a subclass: torch.Size, named tuples stay as they are
        return tuple(_mutable(v) for v in value)
    if isinstance(value, dict):  # and immutable_dict a dict
        return {k: _mutable(v) for k, v in value.items()}
    return value


class _AllSeen(Exception):
    """Raised once every wanted node has run: the rest of the graph is not needed."""


class _NodeValues(MutableArgs, fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, wanted: set[str]):
        super().__init__(gm)
        self.wanted, self.values = wanted, {}

    def run_node(self, n: fx.Node) -> Any:
        value = super().run_node(n)
        if n.name in self.wanted:
            self.values[n.name] = value
            if len(self.values) == len(self.wanted):
                raise _AllSeen
        return value


def node_values(gm: fx.GraphModule, inputs: Sequence, names: set[str]) -> dict[str, Any]:
    """The values of the nodes named ``names`` on ``inputs``; the graph runs only as far as needed.

    >>> node_values(gm, (x,), {"relu"})["relu"].shape          # doctest: +SKIP
    torch.Size([1, 8, 32, 32])
    """
    runner = _NodeValues(gm, set(names))
    try:
        runner.run(*inputs)
    except _AllSeen:
        pass
    return runner.values


class _MetaValues(MutableArgs, fx.Interpreter):
    """Runs the graph on meta tensors and records fake values on the model's device."""

    def __init__(self, gm: fx.GraphModule, mode: FakeTensorMode, device: torch.device):
        super().__init__(gm)
        self.mode, self.device = mode, device

    def run_node(self, n: fx.Node) -> Any:
        value = super().run_node(n)
        n.meta["val"] = torch.utils._pytree.tree_map(self._fake, value)
        return value

    def get_attr(self, target: Any, args: Any, kwargs: Any) -> Any:
        return _to_meta(super().get_attr(target, args, kwargs))

    def call_module(self, target: Any, args: Any, kwargs: Any) -> Any:
        module = self.fetch_attr(target)
        if _keeps_shape(module) and len(args) == 1 and not kwargs and isinstance(args[0], torch.Tensor):
            return torch.empty_like(args[0])  # the meta kernels of BN and activations are slow Python refs
        return _meta_copy(module)(*args, **kwargs)

    def call_function(self, target: Any, args: Any, kwargs: Any) -> Any:
        if _same_as_first(target, args, kwargs):
            return torch.empty_like(args[0])
        return super().call_function(target, args, kwargs)

    def _fake(self, value: Any) -> Any:
        if type(value) is torch.Tensor and value.device.type == "meta":
            return FakeTensor(self.mode, value.detach(), self.device)  # wraps the meta tensor: no dispatch
        if isinstance(value, torch.Tensor):
            with self.mode:
                return torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device=self.device)
        return value


# Shape shortcuts of the meta run: modules and functions whose output is shaped, typed and strided like
# their one tensor input. Exact types only (a subclass may override forward); BatchNorm only in eval mode.
_SHAPE_KEEPING_MODULES = frozenset((
    nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.Sigmoid, nn.Hardsigmoid, nn.Tanh, nn.SiLU, nn.Mish, nn.Hardswish,
    nn.ELU, nn.CELU, nn.SELU, nn.LeakyReLU, nn.GELU, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
    nn.Dropout3d))
_EVAL_BATCH_NORMS = frozenset((nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d))
_UNARY = frozenset((torch.relu, F.relu, F.relu6, F.gelu, F.silu, F.hardswish, F.hardsigmoid, F.hardtanh,
                    F.leaky_relu, F.elu, F.mish, torch.sigmoid, torch.tanh, F.sigmoid, F.tanh, F.dropout))
_BINARY = frozenset((operator.add, operator.mul, operator.sub, operator.iadd, torch.add, torch.mul, torch.sub))


def _keeps_shape(module: torch.nn.Module) -> bool:
    kind = type(module)
    return kind in _SHAPE_KEEPING_MODULES or (kind in _EVAL_BATCH_NORMS and not module.training)


def _same_as_first(target: Any, args: tuple, kwargs: dict) -> bool:
    """A floating-point element-wise call whose output has its first argument's shape, dtype and device."""
    if not args or not isinstance(args[0], torch.Tensor) or not args[0].is_floating_point():
        return False
    try:
        if target in _UNARY:
            rest = list(args[1:]) + list(kwargs.values())
            return not any(isinstance(a, torch.Tensor) for a in rest)
        if target in _BINARY:
            other = args[1] if len(args) == 2 else None
            return not kwargs and isinstance(other, torch.Tensor) and other.shape == args[0].shape \
                and other.dtype == args[0].dtype
    except TypeError:  # an unhashable target
        return False
    return False


def _meta_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A shallow copy of ``module`` (and its children) whose tensors live on the meta device."""
    if _is_quantizer(module):
        return torch.nn.Identity()
    new = copy.copy(module)
    new.__dict__ = dict(module.__dict__)
    new._parameters = {k: None if v is None else _to_meta(v) for k, v in module._parameters.items()}
    new._buffers = {k: None if v is None else _to_meta(v) for k, v in module._buffers.items()}
    new._modules = {k: None if v is None else _meta_copy(v) for k, v in module._modules.items()}
    if hasattr(new, "_flat_weights_names"):  # RNNs cache their weights in a list
        new._flat_weights = [getattr(new, n, None) for n in new._flat_weights_names]
    return new


def _is_quantizer(module: torch.nn.Module) -> bool:
    """Observers and fake-quantizers propagate as the identity: same shape, and their statistics (a
    prepared graph's state) must not move — nor can they run on meta or fake tensors (data-dependent)."""
    from fxprune.core.predicates import is_quantizer  # a leaf module: no cycle (capture is imported by analysis)
    return is_quantizer(module)


def _value_only(module: torch.nn.Module) -> torch.nn.Module:
    """``module``, or a shallow copy whose quantizers (a QAT conv's ``weight_fake_quant``) are identities."""
    if _is_quantizer(module):
        return torch.nn.Identity()
    if not any(_is_quantizer(m) for m in module.modules()):
        return module
    new = copy.copy(module)
    new.__dict__ = dict(module.__dict__)
    new._modules = {k: None if v is None else _value_only(v) for k, v in module._modules.items()}
    return new


def _is_training(gm: fx.GraphModule) -> bool:
    return any(m.training for m in gm.modules() if type(m) is not torch.nn.Module
               and not isinstance(m, fx.GraphModule))


class _FakeEvalProp(_NamesFailure, MutableArgs, FakeTensorProp):
    """Fake propagation that calls eval-mode shallow copies of modules: shapes are the same, and
    ``BatchNorm.forward`` cannot bump the real ``num_batches_tracked`` of a training-mode model."""

    def call_module(self, target: Any, args: Any, kwargs: Any) -> Any:
        module = _value_only(self.fetch_attr(target))
        if module.training:
            module = copy.copy(module)
            module.training = False
        return module(*args, **kwargs)


class _RecordValues(_NamesFailure, MutableArgs, fx.Interpreter):
    """Runs the graph and stores a fake copy of each node's value in its metadata."""

    def __init__(self, gm: fx.GraphModule, mode: FakeTensorMode):
        super().__init__(gm)
        self.mode = mode

    def run_node(self, n: fx.Node) -> Any:
        value = super().run_node(n)
        n.meta["val"] = torch.utils._pytree.tree_map(self._fake, value)
        return value

    def call_module(self, target: Any, args: Any, kwargs: Any) -> Any:
        return _value_only(self.fetch_attr(target))(*args, **kwargs)

    def _fake(self, value: Any) -> Any:
        if isinstance(value, torch.Tensor) and not isinstance(value, torch._subclasses.FakeTensor):
            return self.mode.from_tensor(value)
        return value
