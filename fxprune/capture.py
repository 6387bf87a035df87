"""Capture: a model and example inputs become a GraphModule with a traced value on every node.

``"fx"`` uses ``torch.fx.symbolic_trace`` (layers stay ``call_module`` nodes, readable code, what
``prepare_fx`` consumes; transformer layers are traced into, see :class:`_Tracer`); ``"export"`` uses
``torch.export.export(...).module()`` (ATen ops, parameters as ``get_attr``, literal sizes in the graph).
Values come from a run on the ``meta`` device (see :func:`propagate_values`), or are the fake values a
fresh ``torch.export`` graph already carries. A GraphModule or ExportedProgram is used as it is, at its
own level.
"""
from __future__ import annotations

import copy
import functools
import traceback
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.fx as fx
import operator

import torch.nn as nn
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp
from torch.nn.utils.weight_norm import WeightNorm  # the class (torch.nn.utils.weight_norm is a function)

from .graph import copy_graph_module
from .errors import (CaptureError, ExampleInputError, InvalidOptionError, TrainingModeError,
                     UnsupportedModelError)

LEVELS = ("fx", "export")
_BATCH_NORMS = (torch.nn.modules.batchnorm._BatchNorm,)


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


def capture(model: Any, example_inputs: Any, level: str = "fx") -> Captured:
    """Trace ``model`` at ``level`` and propagate fake values through every node.

    >>> cap = capture(torchvision.models.resnet18().eval(), torch.randn(1, 3, 64, 64))  # doctest: +SKIP
    >>> cap.level, cap.gm.graph.find_nodes(op="call_module")[0].target              # doctest: +SKIP
    ('fx', 'conv1')
    """
    inputs = as_inputs(example_inputs)
    if isinstance(model, torch.export.ExportedProgram):
        gm, level = model.module(), "export"
    elif isinstance(model, fx.GraphModule):
        gm, level = copy_graph_module(model), graph_level(model)
    elif isinstance(model, torch.nn.Module):
        gm = _trace(model, inputs, level)
        if _export_values_complete(gm):  # torch.export just traced fake values on every node: reuse them
            refuse_quantized(gm)
            return Captured(gm, level, inputs)
    else:
        raise UnsupportedModelError(f"expected an nn.Module, GraphModule or ExportedProgram, got "
                                    f"{type(model).__name__}")
    refuse_quantized(gm)
    propagate_values(gm, inputs)
    return Captured(gm, level, inputs)


def _export_values_complete(gm: fx.GraphModule) -> bool:
    """True for a fresh ``torch.export`` graph whose nodes all carry export's fake values; its
    ``_guards_fn`` call (input checks, returns None) gets ``None`` as its value."""
    nodes = [n for n in gm.graph.nodes if n.op != "output"]
    if graph_level(gm) != "export":
        return False
    for node in nodes:
        if "val" not in node.meta and not (node.op == "call_module" and node.target == "_guards_fn"):
            return False
    for node in nodes:
        node.meta.setdefault("val", None)
    return True


def graph_level(gm: fx.GraphModule) -> str:
    """``"export"`` when the graph calls ATen overloads, else ``"fx"``."""
    for node in gm.graph.nodes:
        if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
            return "export"
    return "fx"


def _trace(model: torch.nn.Module, inputs: tuple, level: str) -> fx.GraphModule:
    if level not in LEVELS:
        raise InvalidOptionError(f"capture must be one of {LEVELS}, got {level!r}")
    if level == "fx":
        try:
            gm = _symbolic_trace(model)
        except Exception as exc:  # any tracer failure: name the line, suggest export
            raise CaptureError(_trace_failure(exc, "torch.fx.symbolic_trace", "export")) from exc
        gm.training = model.training
        _refuse_lost_hooks(model, gm)
        return gm
    _refuse_training_batch_norm(model)
    try:
        gm = torch.export.export(model, inputs).module()
    except Exception as exc:
        raise CaptureError(_trace_failure(exc, "torch.export.export", "fx")) from exc
    for module in gm.modules():  # export's module always says training=True; keep the model's mode
        module.training = model.training
    return gm


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


def propagate_values(gm: fx.GraphModule, inputs: Sequence) -> None:
    """Record a fake value (shape, dtype, device) on every node: ``node.meta['val']``.

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
    try:
        if _is_training(gm):
            fake_inputs = [mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for x in inputs]
            _FakeEvalProp(gm, mode).propagate_dont_convert_inputs(*fake_inputs)
        else:
            with torch.no_grad():
                _RecordValues(gm, mode).run(*inputs)
    except Exception as exc:
        shapes = [tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__ for x in inputs]
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ExampleInputError(f"the model rejects example inputs of shapes {shapes}: "
                                f"{type(exc).__name__}: {message}") from exc


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
    from .predicates import is_quantizer  # a leaf module: no cycle (capture is imported by analysis)
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


class _FakeEvalProp(MutableArgs, FakeTensorProp):
    """Fake propagation that calls eval-mode shallow copies of modules: shapes are the same, and
    ``BatchNorm.forward`` cannot bump the real ``num_batches_tracked`` of a training-mode model."""

    def call_module(self, target: Any, args: Any, kwargs: Any) -> Any:
        module = _value_only(self.fetch_attr(target))
        if module.training:
            module = copy.copy(module)
            module.training = False
        return module(*args, **kwargs)


class _RecordValues(MutableArgs, fx.Interpreter):
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
