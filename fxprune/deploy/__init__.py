"""Deployment: write a pruned model for the runtime it ships in, and check it there.

Two targets, each an optional extra:

* **ExecuTorch** (``pip install 'fxprune[executorch]'``): :func:`to_executorch` writes a ``.pte``
  program whose ops are delegated to XNNPACK (``to_edge_transform_and_lower`` with the
  ``XnnpackPartitioner``); ops XNNPACK does not take run on ExecuTorch's portable kernels and are listed
  in :attr:`Deployed.not_delegated`.
* **ONNX Runtime** (``pip install 'fxprune[onnx]'``): :func:`to_onnx` writes an ``.onnx`` model with
  the dynamo exporter (``torch.onnx.export(..., dynamo=True)``).

``quantize="int8"`` first applies PT2E static quantization (``prepare_pt2e`` → calibrate →
``convert_pt2e``): int8 weights per output channel and int8 activations per tensor. ExecuTorch gets
ExecuTorch's ``XNNPACKQuantizer`` (symmetric weights, the pattern XNNPACK's int8 kernels take); ONNX
gets torchao's ``X86InductorQuantizer`` (uint8 activations, int8 weights: the U8S8 form ONNX Runtime's
x86 kernels prefer; the weights in 7 bits, :data:`fxprune.deploy.onnx.WEIGHT_RANGE`, which those kernels
compute exactly on CPUs without VNNI too). The exporter turns the quantize/dequantize pairs into
``QuantizeLinear`` / ``DequantizeLinear``, which ONNX Runtime fuses into ``QLinearConv``, ``QGemm`` and
``MatMulIntegerToFloat``. Activation ranges
come from ``calibration`` — anything :func:`fxprune.data.calibration.iter_batches` reads (a DataLoader, a
list of tensors or tuples, a :class:`~fxprune.data.calibration.Calibration`) — or, when none is given, from
the example inputs alone, which :attr:`Deployed.notes` and a warning say out loud.

The batch dimension is dynamic (``torch.export.Dim``, 1 to ``max_batch``) where the graph allows it;
a graph specialised to its example batch (a literal batch size in a ``view``) is written for that
batch only, and the notes say so. Every artefact is run in its own runtime on the example inputs
before it is written (``check=True``): fp32 outputs must match the pruned graph to float tolerance
(else :class:`~fxprune.errors.DeployError`, nothing written); int8 outputs are reported by their
SQNR against it.

>>> result = fxprune.prune(model, (x,), sparsity=0.5)                          # doctest: +SKIP
>>> fxprune.deploy.to_executorch(result, (x,), "model.pte", quantize="int8")   # doctest: +SKIP
Deployed(model.pte: executorch, int8, batch 1..64, 2.9 MB, SQNR 41.2 dB vs the pruned graph)
>>> run = fxprune.deploy.load("model.pte", threads=1)                          # doctest: +SKIP
>>> run(x)[0].shape                                                            # doctest: +SKIP
torch.Size([1, 1000])
"""
from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from fxprune.deploy.targets import RUNTIMES, Runtime
from fxprune.errors import DeployError, InvalidOptionError, MissingExtraError

#: Every deploy target by name, in the order the CLI offers them (read from :data:`RUNTIMES`).
TARGETS: tuple[str, ...] = tuple(RUNTIMES)
QUANTIZE: tuple[str, ...] = ("int8",)
#: The artefact's suffix per target.
SUFFIX: dict[str, str] = {r.name: r.suffix for r in RUNTIMES.values()}
FP32_RTOL = 1e-4
"""fp32 artefacts must match the pruned graph within this fraction of its largest output magnitude."""
INT8_WARN_DB = 20.0
"""int8 artefacts whose SQNR against the pruned graph falls below this get a warning (and a note)."""
ALIGNMENT = 8
"""Pruned conv/linear widths that are not a multiple of this get a note: vector kernels pad them."""


@dataclass(frozen=True)
class Agreement:
    """How an artefact's outputs, run in its runtime, compare with the pruned graph's."""

    max_abs_error: float
    scale: float
    """The largest magnitude of the reference outputs."""
    sqnr_db: float
    """Signal-to-quantization-noise ratio, ``10 log10(Σ ref² / Σ (ref - out)²)``; inf when equal."""

    @property
    def relative_error(self) -> float:
        return self.max_abs_error / self.scale if self.scale else self.max_abs_error

    def __str__(self) -> str:
        return f"max abs error {self.max_abs_error:.2e} ({self.relative_error:.1e} of max |output|), " \
               f"SQNR {self.sqnr_db:.1f} dB"


@dataclass(frozen=True)
class Deployed:
    """What :func:`to_executorch` / :func:`to_onnx` wrote."""

    path: Path
    target: str
    quantize: Optional[str]
    batch: tuple[int, int]
    """The batch sizes the artefact accepts (min, max); equal when the graph fixes its batch."""
    size_bytes: int
    notes: tuple[str, ...] = ()
    """What the user should know: calibration used, a batch left static and why, pruned widths that
    are not aligned for vector kernels."""
    not_delegated: tuple[str, ...] = ()
    """ExecuTorch: ops left on the portable kernels (XNNPACK took everything else)."""
    agreement: Optional[Agreement] = None
    """The runtime's outputs against the pruned graph on the example inputs (None: not checked)."""

    @property
    def dynamic_batch(self) -> bool:
        return self.batch[0] != self.batch[1]

    def __str__(self) -> str:
        lo, hi = self.batch
        parts = [self.target, self.quantize or "fp32", f"batch {lo}..{hi}" if lo != hi else f"batch {lo}",
                 _size(self.size_bytes)]
        if self.not_delegated:
            parts.append(f"{len(self.not_delegated)} op(s) not delegated to XNNPACK")
        if self.agreement is not None:
            parts.append(f"{self.agreement} vs the pruned graph")
        return f"{self.path.name}: " + ", ".join(parts)


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


# --- the public entry points -----------------------------------------------------------------------
def to_executorch(model: Any, example_inputs: Any, path: Union[str, os.PathLike], *,
                  quantize: Optional[str] = None, calibration: Any = None, max_batch: int = 64,
                  check: bool = True) -> Deployed:
    """Write ``model`` (a PruneResult, GraphModule, nn.Module or ExportedProgram) as an XNNPACK-delegated
    ExecuTorch program (``.pte``) and return what was written.

    >>> fxprune.deploy.to_executorch(result, (x,), "resnet18.pte")   # doctest: +SKIP
    """
    return deploy(model, example_inputs, path, "executorch", quantize=quantize, calibration=calibration,
                  max_batch=max_batch, check=check)


def to_onnx(model: Any, example_inputs: Any, path: Union[str, os.PathLike], *, quantize: Optional[str] = None,
            calibration: Any = None, max_batch: int = 64, check: bool = True) -> Deployed:
    """Write ``model`` as an ONNX model (the dynamo exporter) and return what was written; ``check``
    runs it in ONNX Runtime first.

    >>> fxprune.deploy.to_onnx(result, (x,), "resnet18.onnx", quantize="int8", calibration=loader)  # doctest: +SKIP
    """
    return deploy(model, example_inputs, path, "onnx", quantize=quantize, calibration=calibration,
                  max_batch=max_batch, check=check)


def deploy(model: Any, example_inputs: Any, path: Union[str, os.PathLike], to: str, *,
           quantize: Optional[str] = None, calibration: Any = None, max_batch: int = 64,
           check: bool = True) -> Deployed:
    """:func:`to_executorch` or :func:`to_onnx`, chosen by ``to``. The file is written only once the
    artefact is built (and checked): a failure leaves nothing behind."""
    data, deployed = build(model, example_inputs, to, quantize=quantize, calibration=calibration,
                           max_batch=max_batch, check=check)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, out)
    return _replace_path(deployed, out)


def build(model: Any, example_inputs: Any, to: str, *, quantize: Optional[str] = None, calibration: Any = None,
          max_batch: int = 64, check: bool = True) -> tuple[bytes, Deployed]:
    """The artefact's bytes and its description (``path`` empty), nothing written: the CLI writes
    them beside the rest of its output."""
    _check_options(to, quantize, max_batch)
    require(to)
    module = as_module(model)
    inputs = _as_tuple(example_inputs)
    notes = [note for note in [alignment_note(getattr(model, "plan", None))] if note]
    program, shapes, batch = export_batch(module, inputs, max_batch, notes)
    if quantize:
        program = quantize_pt2e(program, shapes, to, calibration, notes)
    data, left = runtime(to).write(program)
    agreement = _check(data, to, module, inputs, quantize) if check else None
    return data, Deployed(Path(""), to, quantize, batch, len(data), tuple(notes), left, agreement)


def unaligned_widths(plan: Any) -> tuple[list[tuple[str, int, int]], int]:
    """``(weight, kept, original)`` of each pruned conv/linear output width of ``plan`` that is not a
    multiple of :data:`ALIGNMENT`, and how many widths were pruned."""
    pruned = [(key, len(dims[0]), plan.shapes[key][0]) for key, dims in plan.kept_indices.items()
              if key.endswith("weight") and len(plan.shapes[key]) >= 2 and 0 in dims]
    return [w for w in pruned if w[1] % ALIGNMENT], len(pruned)


def alignment_note(plan: Any) -> Optional[str]:
    """Say so when a PruneResult's widths are unaligned: a latency cost ``round_to`` removes
    (bench_deploy: resnet50 at 30%, widths 45/90/180, reaches 0.69 of the MACs-proportional speedup in
    ONNX Runtime, 0.98 with ``round_to=16``)."""
    if plan is None:
        return None
    unaligned, pruned = unaligned_widths(plan)
    if not unaligned:
        return None
    key, kept, original = unaligned[0]
    return (f"{len(unaligned)} of {pruned} pruned conv/linear widths are not a multiple of {ALIGNMENT} "
            f"(first: {key.rsplit('.', 1)[0]}, {kept} of {original}): vector kernels run them at the next "
            f"multiple's cost, so latency falls less than the MACs; prune with round_to=8 (16 for ONNX "
            f"Runtime on AVX-512) to align them")


def _check_options(to: str, quantize: Optional[str], max_batch: int) -> None:
    runtime(to)
    if quantize is not None and quantize not in QUANTIZE:
        raise InvalidOptionError(f"unknown quantize={quantize!r}: expected None or 'int8'")
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise InvalidOptionError(f"max_batch must be a positive int, got {max_batch!r}")


def _replace_path(deployed: Deployed, path: Path) -> Deployed:
    from dataclasses import replace
    return replace(deployed, path=path)


def runtime(to: str) -> Runtime:
    """The record of target ``to``; an unknown name is an :class:`InvalidOptionError` listing the known."""
    if to not in RUNTIMES:
        raise InvalidOptionError(f"unknown deploy target {to!r}: expected one of {', '.join(TARGETS)}")
    return RUNTIMES[to]


# --- inputs -----------------------------------------------------------------------------------------
def require(to: str) -> None:
    """Raise :class:`MissingExtraError` naming the extra when ``to``'s packages are missing."""
    target = runtime(to)
    for package in target.packages:
        try:
            __import__(package)
        except ImportError as exc:
            raise MissingExtraError(f"deploying to {to} needs the {package!r} package, which is not "
                                    f"installed: pip install 'fxprune[{target.extra}]'") from exc


def as_module(model: Any) -> torch.nn.Module:
    """The eval-mode module to deploy: a PruneResult's graph, an ExportedProgram's module, or the module."""
    if isinstance(model, torch.export.ExportedProgram):
        return model.module()
    module = getattr(model, "graph_module", model)
    if not isinstance(module, torch.nn.Module):
        raise InvalidOptionError(f"cannot deploy a {type(model).__name__}: expected a PruneResult, a "
                                 f"GraphModule, an nn.Module or an ExportedProgram")
    if isinstance(module, fx.GraphModule) and _is_export_level(module):
        return module  # an unlifted export graph: .eval() is not allowed on it, and it is already eval
    return module.eval()


def _is_export_level(gm: fx.GraphModule) -> bool:
    return any(isinstance(n.target, torch._ops.OpOverload) for n in gm.graph.nodes if n.op == "call_function")


def _as_tuple(example_inputs: Any) -> tuple:
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    if not inputs or not all(isinstance(t, torch.Tensor) for t in inputs):
        raise InvalidOptionError("example_inputs must be a tensor or a non-empty tuple of tensors, got "
                                 f"{type(example_inputs).__name__}")
    return inputs


def export_batch(module: torch.nn.Module, inputs: tuple, max_batch: int, notes: list[str]
                 ) -> tuple[torch.export.ExportedProgram, Optional[tuple], tuple[int, int]]:
    """``(program, dynamic_shapes, (min, max) batch)``: dim 0 of every input is one ``Dim('batch')``
    if the graph exports so, else the example's batch is kept and a note says why."""
    size = inputs[0].shape[0] if inputs[0].dim() else 0
    if max_batch < 2 or not all(t.dim() and t.shape[0] == size for t in inputs):
        notes.append("batch is static: the inputs do not share a leading batch dimension")
        return _export(module, inputs, None, "export"), None, (size, size)
    # export specialises a size-1 dim, so trace with a batch of 2 (the example repeated)
    trace = tuple(torch.cat([t, t]) if size == 1 else t for t in inputs)
    batch = torch.export.Dim("batch", min=1, max=max(max_batch, trace[0].shape[0]))
    shapes = tuple({0: batch} for _ in inputs)
    try:
        program = torch.export.export(module, trace, dynamic_shapes=shapes)
    except Exception as exc:  # torch.export's UserError / constraint violations: the graph fixes its batch
        reason = " ".join(str(exc).split())[:200]
        notes.append(f"batch is static ({size}): the graph does not export with a dynamic batch ({reason})")
        return _export(module, inputs, None, "export"), None, (size, size)
    return program, shapes, (1, batch.max)


def _export(module: torch.nn.Module, inputs: tuple, shapes: Optional[tuple], stage: str
            ) -> torch.export.ExportedProgram:
    try:
        return torch.export.export(module, inputs, dynamic_shapes=shapes)
    except Exception as exc:
        raise DeployError(f"{stage}: torch.export could not capture the graph: {type(exc).__name__}: "
                          f"{exc}") from exc


# --- quantization -------------------------------------------------------------------------------------
def quantize_pt2e(program: torch.export.ExportedProgram, shapes: Optional[tuple], to: str, calibration: Any,
                  notes: list[str]) -> torch.export.ExportedProgram:
    """PT2E static int8 quantization with the target's quantizer, calibrated on ``calibration`` (or on
    the example inputs, said in ``notes`` and a warning); the quantized graph, exported again."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    inputs = tuple(program.example_inputs[0])
    try:
        prepared = prepare_pt2e(split_reused_modules(program.module()), runtime(to).quantizer())
    except Exception as exc:
        raise DeployError(f"quantize for {to}: PT2E could not prepare the graph: {exc}") from exc
    count = _calibrate(prepared, inputs, calibration)
    if calibration is None:
        note = (f"int8 activation ranges calibrated on the example inputs only ({inputs[0].shape[0]} "
                f"sample(s), no calibration data given): pass calibration= for representative ranges")
        warnings.warn(note, UserWarning, stacklevel=4)
    else:
        note = f"int8 activation ranges calibrated on {count} batch(es) of calibration data"
    notes.append(note)
    return _export(convert_pt2e(prepared), inputs, shapes, f"quantize for {to}")


def split_reused_modules(gm: fx.GraphModule) -> fx.GraphModule:
    """Give each call of a reused module its own source partition (in place; returns ``gm``).

    PT2E's quantizers find patterns (conv -> add -> relu) by *source partition*: the nodes that came from
    one module, which torch.export's non-strict capture records only as the ``nn_module_stack`` entry
    of the module's name. torchvision's ResNet blocks call one ``self.relu`` twice, so both calls are one
    partition with two outputs, and torchao's X86InductorQuantizer refuses the graph ("Input partition
    has more than one output node"). Each connected run of nodes of one module is one call: it gets the
    name ``<module>#<k>``.
    """
    by_module: dict[str, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        stack = node.meta.get("nn_module_stack") if node.op == "call_function" else None
        if stack and "source_fn_stack" not in node.meta:
            by_module.setdefault(list(stack.values())[-1][0], []).append(node)
    for name, nodes in by_module.items():
        for k, call in enumerate(_connected_runs(nodes)):
            if k == 0:
                continue
            for node in call:
                stack = dict(node.meta["nn_module_stack"])
                key = list(stack)[-1]
                stack[key] = (f"{name}#{k}", stack[key][1])
                node.meta["nn_module_stack"] = stack
    return gm


def _connected_runs(nodes: list[fx.Node]) -> list[list[fx.Node]]:
    """``nodes`` split into groups connected through each other (in graph order)."""
    members, group_of, groups = set(nodes), {}, []
    for node in nodes:
        linked = {group_of[a] for a in node.all_input_nodes if a in members}
        if not linked:
            group_of[node] = len(groups)
            groups.append([node])
            continue
        target = min(linked)
        for other in sorted(linked - {target}):  # a node that joins two runs merges them
            for moved in groups[other]:
                group_of[moved] = target
            groups[target].extend(groups[other])
            groups[other] = []
        group_of[node] = target
        groups[target].append(node)
    return [g for g in groups if g]


def _calibrate(prepared: fx.GraphModule, inputs: tuple, calibration: Any) -> int:
    batches: Iterable[tuple] = [inputs]
    if calibration is not None:
        from fxprune.data.calibration import iter_batches
        batches = iter_batches(calibration, n_inputs=len(inputs))
    count = 0
    with torch.no_grad():
        for count, batch in enumerate(batches, 1):
            try:
                prepared(*batch)
            except Exception as exc:
                raise DeployError(f"quantize: calibration batch {count - 1} "
                                  f"({[tuple(t.shape) for t in batch]}) does not run: {exc}") from exc
    return count


# --- running an artefact ---------------------------------------------------------------------------------
def load(source: Union[str, os.PathLike, bytes], target: Optional[str] = None,
         threads: Optional[int] = None) -> Callable[..., list[torch.Tensor]]:
    """A callable that runs a ``.pte`` in ExecuTorch's runtime or an ``.onnx`` in ONNX Runtime and returns
    its outputs as a list of tensors. ``target`` is read from the suffix unless given (it must be for
    bytes); ``threads`` fixes the runtime's thread pool (ExecuTorch's is process-wide).

    >>> run = fxprune.deploy.load("model.onnx", threads=1)   # doctest: +SKIP
    >>> logits, = run(x)                                     # doctest: +SKIP
    """
    target = target or _target_of(source)
    require(target)
    return runtime(target).load(source, threads)


def _target_of(source: Any) -> str:
    suffix = Path(source).suffix if isinstance(source, (str, os.PathLike)) else ""
    for runtime in RUNTIMES.values():
        if suffix == runtime.suffix:
            return runtime.name
    raise InvalidOptionError(f"cannot tell the runtime of {source if suffix else 'these bytes'!r}: "
                             f"expected a {' or '.join(SUFFIX.values())} file, or pass target=")


def compare(run: Callable[..., list[torch.Tensor]], reference: torch.nn.Module, inputs: Sequence[torch.Tensor]
            ) -> Agreement:
    """Run the artefact and the reference module on ``inputs``; how far apart their outputs are."""
    with torch.no_grad():
        expected = [t for t in pytree.tree_leaves(reference(*inputs)) if isinstance(t, torch.Tensor)]
    actual = run(*inputs)
    if len(actual) != len(expected):
        raise DeployError(f"the artefact returns {len(actual)} output(s), the pruned graph {len(expected)}")
    return agreement(expected, actual)


def agreement(expected: Sequence[torch.Tensor], actual: Sequence[torch.Tensor]) -> Agreement:
    """Max abs error, reference scale and SQNR over all outputs together."""
    pairs = [(e.detach().double().flatten(), a.detach().double().flatten()) for e, a in zip(expected, actual)]
    for i, (e, a) in enumerate(pairs):
        if e.shape != a.shape:
            raise DeployError(f"output {i}: the artefact returns {a.numel()} values, the pruned graph {e.numel()}")
    ref = torch.cat([e for e, _ in pairs])
    err = torch.cat([e - a for e, a in pairs])
    signal, noise = float(ref.pow(2).sum()), float(err.pow(2).sum())
    sqnr = math.inf if noise == 0 else 10 * math.log10(signal / noise) if signal else -math.inf
    return Agreement(float(err.abs().max()), float(ref.abs().max()), sqnr)


def _check(data: bytes, to: str, reference: torch.nn.Module, inputs: tuple, quantize: Optional[str]) -> Agreement:
    try:
        result = compare(load(data, to), reference, inputs)
    except DeployError:
        raise
    except Exception as exc:
        raise DeployError(f"{to}: the artefact does not run in its runtime: {type(exc).__name__}: {exc}") from exc
    if quantize is None and not result.relative_error <= FP32_RTOL:
        raise DeployError(f"{to}: the artefact's outputs differ from the pruned graph ({result}; tolerance "
                          f"{FP32_RTOL:g} of max |output|); nothing written")
    if quantize is not None and result.sqnr_db < INT8_WARN_DB:
        warnings.warn(f"{to}: the {quantize} artefact is far from the pruned graph ({result}; below "
                      f"{INT8_WARN_DB:g} dB): calibrate on representative data, or keep fp32", UserWarning,
                      stacklevel=4)
    return result
