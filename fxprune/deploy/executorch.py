"""ExecuTorch: an XNNPACK-delegated ``.pte`` program (``pip install 'fxprune[executorch]'``).

Ops XNNPACK does not take run on ExecuTorch's portable kernels and are listed in
:attr:`fxprune.deploy.Deployed.not_delegated`. int8 uses ExecuTorch's ``XNNPACKQuantizer`` (symmetric
weights per output channel, the pattern XNNPACK's int8 kernels take), with the adds, muls and cats
that do not follow a convolution left fp32 (:func:`keep_joins_fp32`).

>>> data, not_delegated = lower(torch.export.export(model, (x,)))   # doctest: +SKIP
>>> load(data)(x)[0].shape                                           # doctest: +SKIP
torch.Size([1, 1000])
"""
from __future__ import annotations

import operator
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import torch
import torch.fx as fx

from fxprune.errors import DeployError


def quantizer() -> Any:
    """``XNNPACKQuantizer`` with symmetric per-channel int8, keeping joins that follow no conv fp32."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer, get_symmetric_quantization_config)

    class Int8ForXnnpack(XNNPACKQuantizer):
        def transform_for_annotation(self, model: fx.GraphModule) -> fx.GraphModule:
            return scalars_to_float_constants(model)

        def annotate(self, model: fx.GraphModule) -> fx.GraphModule:
            return super().annotate(keep_joins_fp32(model))

    return Int8ForXnnpack().set_global(get_symmetric_quantization_config(is_per_channel=True))


ARITHMETIC = (torch.ops.aten.add.Tensor, torch.ops.aten.mul.Tensor)
JOINS = (*ARITHMETIC, torch.ops.aten.cat.default)
THROUGH = ("batch_norm", "relu", "hardtanh", "hardswish", "hardsigmoid", "silu", "sigmoid", "gelu", "pool")


def _int8_joins_only_after_convolutions(node: fx.Node) -> bool:
    """Whether XNNPACKQuantizer may make ``node`` int8: anything but an ``add``, ``mul`` or ``cat``
    none of whose inputs comes from a convolution.

    XNNPACKQuantizer quantizes every add, mul and cat, a cat's inputs at its output's scale. A CNN's
    residual adds (conv -> batch norm -> add), squeeze-excitation products and concatenated branches
    keep their int8 there. A transformer's are its residual stream, norms, gates, rotary embeddings
    and the class token joined to the patches, whose ranges one int8 scale does not hold:
    bench_deploy's LLaMA at 50% gave SQNR 17.3 dB with them and 28.8 dB without. vit_b_16 gave 10-11 dB.
    Its small class token rounded at the patches' scale, and the head reads only that token.
    X86InductorQuantizer, ONNX's, draws the same line.
    """
    if node.op != "call_function" or node.target not in JOINS:
        return True
    return any(_from_convolution(a) for a in node.all_input_nodes)


def keep_joins_fp32(gm: fx.GraphModule) -> fx.GraphModule:
    """Mark each add, mul and cat that may not be int8 as annotated with nothing, which the quantizer's
    patterns skip and leave fp32 (in place; returns ``gm``). A filter function would not do: the cat
    pattern ignores it."""
    from torchao.quantization.pt2e.quantizer import QuantizationAnnotation
    for node in gm.graph.nodes:
        if not _int8_joins_only_after_convolutions(node):
            node.meta["quantization_annotation"] = QuantizationAnnotation(_annotated=True)
    return gm


def _from_convolution(node: fx.Node) -> bool:
    while node.op == "call_function" and any(name in str(node.target) for name in THROUGH):
        node = node.args[0]
    return node.op == "call_function" and "conv" in str(node.target)


def scalars_to_float_constants(gm: fx.GraphModule) -> fx.GraphModule:
    """The scalar operand of each ``add``/``mul`` that may be int8 as a float constant the quantizer can
    observe (in place; returns ``gm``).

    XNNPACKQuantizer does this for *every* ``add``/``mul`` — also the ``0`` of an integer
    ``arange(n) + 0`` (positions of a causal mask), which a float constant promotes to float, so the
    ``index`` they feed fails at calibration ("tensors used as indices must be long"). Only the joins
    :func:`keep_joins_fp32` leaves to the quantizer, which follow a convolution and so are floating,
    get a constant here.
    """
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target in ARITHMETIC and _int8_joins_only_after_convolutions(node):
            node.args = tuple(a if isinstance(a, fx.Node) else _float_constant(gm, node, a) for a in node.args)
    gm.recompile()
    return gm


def _float_constant(gm: fx.GraphModule, user: fx.Node, scalar: Any) -> fx.Node:
    from torchao.quantization.pt2e.utils import get_new_attr_name_with_prefix
    name = get_new_attr_name_with_prefix("_tensor_constant_")(gm)
    constant = torch.tensor(float(scalar))
    gm.register_buffer(name, constant)
    with gm.graph.inserting_before(user):
        node = gm.graph.get_attr(name)
    node.meta["val"] = user.meta["val"].fake_mode.from_tensor(constant, static_shapes=True)
    return node


# --- lowering -------------------------------------------------------------------------------------------
def lower(program: torch.export.ExportedProgram) -> tuple[bytes, tuple]:
    """The ``.pte`` bytes and the ops left on the portable kernels."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import ExecutorchBackendConfig, to_edge_transform_and_lower
    try:
        edge = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()])
        lowered = edge.exported_program()
        config = ExecutorchBackendConfig(sym_shape_eval_pass=_range_bound_pass(lowered.range_constraints))
        return bytes(edge.to_executorch(config).buffer), _not_delegated(lowered.graph)
    except Exception as exc:
        raise DeployError(f"executorch: lowering to XNNPACK failed: {type(exc).__name__}: {exc}") from exc


def _range_bound_pass(ranges: Mapping[Any, Any]) -> Any:
    """Memory planning's bound for every dynamic size, from the program's range constraints.

    ExecuTorch's default pass bounds a size by the shape environment the lowering leaves in the nodes'
    metadata, which (ExecuTorch 1.5.1, XNNPACK) narrows a ``Dim("batch", max=16)`` to 15 whatever the
    max: a .pte exported for batches 1..16 then refuses batch 16 (``set_inputs`` error 0x10). The
    program's ``range_constraints`` keep the range export was given, so this pass bounds by those.
    """
    import torch.utils._pytree as pytree
    from executorch.exir.pass_base import PassBase, PassResult
    from executorch.exir.tensor import TensorSpec
    from torch.utils._sympy.value_ranges import bound_sympy

    def bound(size: Any) -> int:
        return size if isinstance(size, int) else int(bound_sympy(size.node.expr, dict(ranges)).upper)

    class RangeBoundShapes(PassBase):
        def call(self, graph_module: fx.GraphModule) -> PassResult:
            for module in graph_module.modules():
                for node in module.graph.nodes if isinstance(module, fx.GraphModule) else ():
                    for spec in pytree.tree_flatten(node.meta.get("spec", []))[0]:
                        if isinstance(spec, TensorSpec):
                            spec.shape = [bound(s) for s in spec.shape]
                            spec.stride = [bound(s) for s in spec.stride]
            return PassResult(graph_module, True)

    return RangeBoundShapes()


def _not_delegated(graph: fx.Graph) -> tuple[str, ...]:
    from executorch.exir.delegate import executorch_call_delegate
    skip = (executorch_call_delegate, operator.getitem, torch.ops.aten.sym_size.int)  # sym_size: a shape read
    return tuple(getattr(n.target, "__name__", str(n.target)) for n in graph.nodes
                 if n.op == "call_function" and n.target not in skip)


# --- running ---------------------------------------------------------------------------------------------
def check_pte(source: Any) -> None:
    """Refuse a ``.pte`` whose flatbuffer does not parse (ExecuTorch's loader aborts the process on some
    malformed files). A ``.pte`` that parses is still trusted input to the runtime: load only your own.

    >>> check_pte(b"<\\x00\\x00\\x00ET12eh00")                    # doctest: +SKIP
    Traceback (most recent call last):
    fxprune.errors.DeployError: these bytes is not a valid ExecuTorch program: ...
    """
    from executorch.exir._serialize._program import deserialize_pte_binary
    data = source if isinstance(source, bytes) else _read_pte(Path(source))
    if len(data) < 8 or data[4:8] != b"ET12":
        raise DeployError(f"{_pte_name(source)} is not an ExecuTorch program (no 'ET12' identifier)")
    try:
        deserialize_pte_binary(data)
    except Exception as exc:  # any parse failure: the runtime must not see it
        raise DeployError(f"{_pte_name(source)} is not a valid ExecuTorch program: {type(exc).__name__}: "
                          f"{str(exc).strip()[:200]}") from exc


def _read_pte(path: Path) -> bytes:
    from fxprune.safe_files import read_bounded
    return read_bounded(path, limit=16 << 30, what=".pte")


def _pte_name(source: Any) -> str:
    return "these bytes" if isinstance(source, bytes) else str(source)


def load(source: Any, threads: Optional[int]) -> Callable[..., list[torch.Tensor]]:
    """Run a ``.pte`` (a path or its bytes) in ExecuTorch's runtime; ``threads`` sets its process-wide pool."""
    from executorch.runtime import Runtime
    if threads is not None:
        from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool
        _unsafe_reset_threadpool(threads)
    check_pte(source)  # what can be checked in Python first: the runtime aborts on some malformed files
    program = Runtime.get().load_program(source if isinstance(source, bytes) else Path(source))
    method = program.load_method("forward")

    def run(*inputs: torch.Tensor) -> list[torch.Tensor]:
        return list(method.execute([t.contiguous() for t in inputs]))
    return run
