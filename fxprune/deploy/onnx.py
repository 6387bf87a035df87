"""ONNX Runtime: an ``.onnx`` model from the dynamo exporter (``pip install 'fxprune[onnx]'``).

int8 uses torchao's ``X86InductorQuantizer`` (uint8 activations, int8 weights: the U8S8 form ONNX
Runtime's x86 kernels prefer). The exporter turns the quantize/dequantize pairs into
``QuantizeLinear`` / ``DequantizeLinear``, which ONNX Runtime fuses into ``QLinearConv`` and ``QGemm``.

>>> data, _ = lower(torch.export.export(model, (x,)))   # doctest: +SKIP
>>> load(data, threads=1)(x)[0].shape                     # doctest: +SKIP
torch.Size([1, 1000])
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from fxprune.errors import DeployError


def quantizer() -> Any:
    """torchao's ``X86InductorQuantizer`` with its default (U8S8) config."""
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer, get_default_x86_inductor_quantization_config)
    return X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config())


def lower(program: torch.export.ExportedProgram) -> tuple[bytes, tuple[str, ...]]:
    """The ``.onnx`` bytes (every op runs in ONNX Runtime: nothing is left out)."""
    try:
        onnx_program = torch.onnx.export(program, dynamo=True, verbose=False, optimize=True)
        return onnx_program.model_proto.SerializeToString(), ()
    except Exception as exc:
        raise DeployError(f"onnx: the dynamo exporter failed: {type(exc).__name__}: {exc}") from exc


def load(source: Any, threads: Optional[int]) -> Callable[..., list[torch.Tensor]]:
    """Run an ``.onnx`` (a path or its bytes) in ONNX Runtime on the CPU."""
    import onnxruntime
    options = onnxruntime.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.log_severity_level = 3  # errors only: not the NCHWc-transformer notices
    model = source if isinstance(source, bytes) else str(source)
    session = onnxruntime.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]

    def run(*inputs: torch.Tensor) -> list[torch.Tensor]:
        feeds = {name: t.detach().cpu().numpy() for name, t in zip(names, inputs)}
        return [torch.from_numpy(y) for y in session.run(None, feeds)]
    return run
