"""The runtimes fxprune deploys to, one :class:`Runtime` record each: adding a runtime is one record
(and a module with its quantizer, writer and loader) plus its tests. The API, the CLI's ``--to`` choices
and the suffix a loaded file is recognised by are all read from :data:`RUNTIMES`.

>>> RUNTIMES["onnx"].suffix
'.onnx'
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from fxprune.deploy import executorch, onnx


@dataclass(frozen=True)
class Runtime:
    """One deploy target."""

    name: str
    """What ``to=`` / ``--to`` accepts."""
    suffix: str
    """The artefact's file suffix, by which :func:`fxprune.deploy.load` recognises it."""
    extra: str
    """The pip extra that installs :attr:`packages`: ``pip install 'fxprune[<extra>]'``."""
    packages: tuple[str, ...]
    """The importable packages the runtime needs, checked in this order."""
    quantizer: Callable[[], Any]
    """The PT2E quantizer for ``quantize="int8"``, in the form the runtime's int8 kernels take."""
    write: Callable[..., tuple[bytes, tuple[str, ...]]]
    """``(ExportedProgram) -> (artefact bytes, ops the runtime's accelerated backend did not take)``."""
    load: Callable[..., Callable]
    """``(path or bytes, threads) -> run(*inputs) -> list of output tensors``."""
    doc: str
    """One line for ``--help``."""


RUNTIMES: dict[str, Runtime] = {r.name: r for r in (
    Runtime("executorch", ".pte", "executorch", ("executorch",), executorch.quantizer, executorch.lower,
            executorch.load, "model.pte (ExecuTorch, XNNPACK)"),
    Runtime("onnx", ".onnx", "onnx", ("onnx", "onnxscript", "onnxruntime"), onnx.quantizer, onnx.lower,
            onnx.load, "model.onnx (ONNX Runtime)"),
)}
