"""ONNX Runtime: an ``.onnx`` model from the dynamo exporter (``pip install 'fxprune[onnx]'``).

int8 uses torchao's ``X86InductorQuantizer`` (uint8 activations, int8 weights: the U8S8 form ONNX
Runtime's x86 kernels prefer), its weights in 7 bits (``WEIGHT_RANGE``, ONNX Runtime's own
``reduce_range``). The exporter turns the quantize/dequantize pairs into ``QuantizeLinear`` /
``DequantizeLinear``, which ONNX Runtime fuses into ``QLinearConv``, ``QGemm`` and
``MatMulIntegerToFloat``.

>>> data, _ = lower(torch.export.export(model, (x,)))   # doctest: +SKIP
>>> load(data, threads=1)(x)[0].shape                     # doctest: +SKIP
torch.Size([1, 1000])
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import torch

from fxprune.errors import DeployError


#: int8 weights in 7 bits. ONNX Runtime's U8S8 integer GEMM (MLAS) on x86 CPUs without VNNI (AVX2,
#: AVX-512F) multiplies with ``vpmaddubsw``, which adds each pair of uint8 x int8 products into an int16
#: and saturates: 2 x 255 x 127 = 64770 does not fit 32767, 2 x 255 x 64 = 32640 does. With full-range
#: weights ONNX Runtime's fused MatMulIntegerToFloat/QGemm gave 13.2 dB SQNR (ViT) and 13.4 dB (a small
#: LM) on an AVX2 machine where the same artefact with its QDQ fusions disabled, and the PT2E graph in
#: PyTorch, gave 36.0 / 42.6 dB; with 7-bit weights all three agree: 33.6 / 39.7 dB. This is ONNX
#: Runtime's own ``quantize_static(reduce_range=True)`` ("7-bit quantization for non-VNNI CPUs").
WEIGHT_RANGE = (-64, 63)


def quantizer() -> Any:
    """torchao's ``X86InductorQuantizer`` with its default (U8S8) config, weights in
    :data:`WEIGHT_RANGE` (7 bits: exact in every x86 kernel of ONNX Runtime)."""
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer, get_default_x86_inductor_quantization_config)
    config = get_default_x86_inductor_quantization_config()
    low, high = WEIGHT_RANGE
    weight = dataclasses.replace(config.weight, quant_min=low, quant_max=high)
    return X86InductorQuantizer().set_global(dataclasses.replace(config, weight=weight))


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
