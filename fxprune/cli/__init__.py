"""The ``fxprune`` command: prune a model from the shell, or inspect its channel groups.

    fxprune prune torchvision:resnet18 --sparsity 0.5 --input-shape 1,3,224,224 --out pruned/
    fxprune inspect torchvision:resnet18 --input-shape 1,3,224,224

``SPEC`` names the model: ``torchvision:NAME`` (random weights, ``torchvision.models.get_model``),
``package.module:factory`` (imported and called with no arguments; it returns an ``nn.Module``,
GraphModule or ExportedProgram) or a ``.pt2`` file from ``torch.export.save`` (loaded with
:func:`fxprune.io.load_pt2`, which refuses archives that would be unpickled). Models run in eval mode on
random inputs of ``--input-shape`` (repeat it for several inputs; a ``.pt2`` may use its own example
inputs). ``hf:PATH_OR_CONFIG`` is a HuggingFace model directory or ``config.json`` (see
:mod:`fxprune.cli.hf`): it is pruned by :mod:`fxprune.hf` and ``--out`` becomes a directory that
``from_pretrained`` loads; a checkpoint directory given without ``--input-shape`` is pruned disk to disk,
one layer at a time (:func:`fxprune.hf.prune_checkpoint`: models larger than memory).

``prune`` writes to ``--out``: the saved result (``plan.json``, ``model.safetensors``, ``module.py``, see
:func:`fxprune.save`), ``summary.md`` (the table it prints) and ``widths.png`` (per-layer widths before and
after). ``--to executorch`` adds ``model.pte`` (XNNPACK-delegated), ``--to onnx`` adds ``model.onnx``;
``--quantize int8`` quantizes it first (PT2E; activation ranges from ``--calibration``, else from the
random example inputs, which it says), and each is run in its runtime and compared with the pruned
graph before anything is written (see :mod:`fxprune.deploy`). Every expected failure — a bad option,
SPEC or shape, any :class:`fxprune.errors.FxPruneError` — prints one line ``fxprune: error: ...`` to
stderr and exits 2; nothing is written then.
"""
from __future__ import annotations

import argparse
import importlib
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from fxprune import __version__
from fxprune.errors import FxPruneError
from fxprune.options import PruneOptions
from fxprune.progress import stage_bar
from fxprune.deploy import TARGETS
from fxprune.cli.flags import MODEL_FLAGS, add_option_flags, given_options
from fxprune.core.ungrouped import ungrouped
from fxprune.data.criteria import CRITERIA, DATA_CRITERIA, GRADIENT_CRITERIA
from fxprune.core.plan import ungrouped_lines
from fxprune.cli.format import CliError, format_sparsity, markdown_table as _table


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's own errors: one line, like ours
        self.exit(2, f"fxprune: error: {message} (see '{self.prog} --help')\n")


# --- arguments ------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fxprune", description="Structured pruning of PyTorch models as torch.fx "
                                                 "graph rewrites.")
    parser.add_argument("--version", action="version", version=f"fxprune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="COMMAND")
    prune = sub.add_parser("prune", help="prune a model and write the result, a summary and a chart",
                           description="Prune SPEC and write the result, summary.md and widths.png to --out.")
    _model_arguments(prune)
    prune.add_argument("--out", required=True, type=Path, help="directory to write to (created)")
    add_option_flags(prune, exclude=MODEL_FLAGS)
    prune.add_argument("--calibration", type=Path, metavar="FILE.safetensors",
                       help="calibration data: tensors 'input' (or 'input_0', 'input_1', ...) whose rows are "
                            "samples, and for taylor/hessian 'target' (class indices, cross-entropy loss)")
    prune.add_argument("--calibration-batch-size", type=_positive, default=32, metavar="N",
                       help="rows per calibration batch (default 32)")
    prune.add_argument("--max-batches", type=_positive, default=None, metavar="N",
                       help="read at most N calibration batches")
    prune.add_argument("--to", choices=TARGETS, help="also write model.pte (ExecuTorch, "
                                                                   "XNNPACK) or model.onnx (ONNX Runtime)")
    prune.add_argument("--quantize", choices=("int8",), help="PT2E int8 quantization of the --to artefact")
    prune.add_argument("--no-progress", action="store_true", help="no progress bar")
    prune.add_argument("--no-chart", action="store_true", help="do not write widths.png (no matplotlib)")
    prune.add_argument("--output", choices=("graph", "module"), default="graph",
                       help="graph (default: the pruned graph, module.py) or module: the model's own class, "
                            "saved as its state_dict (model.safetensors) with plan.json and sizes.json; load "
                            "with fxprune.module.load(DIR, FACTORY())")
    inspect = sub.add_parser("inspect", help="print the channel groups and why any are frozen",
                             description="Print SPEC's channel groups and why any are frozen, without "
                                         "pruning.")
    _model_arguments(inspect)
    return parser


def _model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("spec", metavar="SPEC", help="torchvision:NAME, package.module:factory, FILE.pt2 or "
                                                     "hf:PATH_OR_CONFIG (a HuggingFace model directory)")
    parser.add_argument("--input-shape", type=_shape, action="append", metavar="N,C,H,W",
                        help="shape of a random example input (repeat for several inputs)")
    add_option_flags(parser, only=MODEL_FLAGS)


MAX_INPUT_ELEMENTS = 2 ** 31
"""The largest random example input ``--input-shape`` may ask for (8 GiB of float32)."""


def _shape(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(d) for d in text.split(","))
    except ValueError:
        dims = ()
    if not dims or any(d <= 0 for d in dims):
        raise argparse.ArgumentTypeError(f"bad shape {text!r}: expected positive integers separated by "
                                         f"commas, like 1,3,224,224")
    if math.prod(dims) > MAX_INPUT_ELEMENTS:  # a typo's 10**30 elements: refused, not allocated
        raise argparse.ArgumentTypeError(f"bad shape {text!r}: {math.prod(dims):.3g} elements, more than "
                                         f"{MAX_INPUT_ELEMENTS:.3g}")
    return dims


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


# --- SPEC -> model ---------------------------------------------------------------------------------
def load_model(spec: str) -> Any:
    """An eval-mode model (or ExportedProgram) from a SPEC string."""
    if spec.endswith(".pt2"):
        return _load_pt2(Path(spec))
    source, sep, name = spec.partition(":")
    if not sep or not source or not name:
        raise CliError(f"bad SPEC {spec!r}: expected torchvision:NAME, package.module:factory or a .pt2 file")
    if source == "hf":
        from fxprune.cli.hf import load
        return load(name)
    model = _torchvision(name) if source == "torchvision" else _factory(source, name)
    if isinstance(model, torch.export.ExportedProgram):
        return model
    if not isinstance(model, torch.nn.Module):
        raise CliError(f"SPEC {spec!r} returned {type(model).__name__}, not an nn.Module or ExportedProgram")
    return model.eval()


def _load_pt2(path: Path) -> torch.export.ExportedProgram:
    from fxprune.io import load_pt2
    if not path.is_file():
        raise CliError(f"bad SPEC: no file {str(path)!r}")
    return load_pt2(path)


def _torchvision(name: str) -> torch.nn.Module:
    try:
        import torchvision
    except ImportError as exc:
        raise CliError(f"SPEC torchvision:{name} needs torchvision installed") from exc
    try:
        return torchvision.models.get_model(name, weights=None)
    except ValueError as exc:
        raise CliError(f"bad SPEC: torchvision has no model {name!r} (see "
                       f"torchvision.models.list_models())") from exc


def _factory(module_name: str, attr: str) -> Any:
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise CliError(f"bad SPEC: cannot import {module_name!r}: {exc}") from exc
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise CliError(f"bad SPEC: {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise CliError(f"bad SPEC: {module_name}:{attr} is not callable")
    try:
        return obj()
    except Exception as exc:  # the user's factory failed: name it
        raise CliError(f"bad SPEC: {module_name}:{attr}() raised {type(exc).__name__}: {exc}") from exc


def random_or_saved_inputs(model: Any, shapes: Optional[Sequence[tuple[int, ...]]], seed: int) -> tuple:
    """Random inputs of the given shapes, or a .pt2's own example inputs."""
    if _is_hf(model):
        from fxprune.cli.hf import random_hf_inputs
        return random_hf_inputs(model, shapes, seed)
    if shapes:
        generator = torch.Generator().manual_seed(seed)
        return tuple(torch.randn(s, generator=generator) for s in shapes)
    saved = getattr(model, "example_inputs", None) if isinstance(model, torch.export.ExportedProgram) else None
    if saved and not saved[1] and saved[0]:
        return tuple(saved[0])
    raise CliError("--input-shape is required (e.g. --input-shape 1,3,224,224)")


# --- prune ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Summary:
    """What ``fxprune prune`` reports."""

    groups: tuple[tuple[str, int, int, str], ...]
    """(group, width before, width after, note) per group."""
    params: tuple[int, int]
    macs: tuple[int, int]
    verify: str
    ungrouped: tuple[str, ...] = ()
    """The plan's tensors in no group, one line per reason (``fxprune.core.plan.ungrouped_lines``)."""

    def markdown(self, title: str) -> str:
        rows = [("group", "width", "note")]
        rows += [(name, f"{before} → {after}", note) for name, before, after, note in self.groups]
        lines = [f"# fxprune: {title}", "", *_table(rows), "",
                 *_table([("", "before", "after", "ratio"),
                          ("params", *_counts(*self.params)), ("MACs", *_counts(*self.macs))]),
                 "", f"{self.verify}", ""]
        if self.ungrouped:
            lines += [*self.ungrouped, ""]
        return "\n".join(lines)


def _counts(before: int, after: int) -> tuple[str, str, str]:
    ratio = f"{after / before:.1%}" if before else "-"
    return f"{before:,}", f"{after:,}", ratio


def _group_rows(plan) -> tuple[tuple[str, int, int, str], ...]:
    rows = []
    for g in plan.groups:
        note = "approximate" if not g.exact else ""
        if g.frozen:
            why = g.reasons[0] if g.reasons else "frozen"
            note = f"{g.frozen} frozen: {why}" if g.frozen < g.size else f"frozen: {why}"
        rows.append((g.name, g.size, g.kept, note))
    return tuple(rows)


def run_prune(args: argparse.Namespace) -> int:
    from fxprune.safe_files import check_output
    check_output(args.out)  # a link, a file, someone else's directory: refused before any work
    _check_chart(args.no_chart)
    _check_deploy(args.to, args.quantize)
    from fxprune.cli.hf import is_checkpoint, prune_checkpoint_and_report
    if is_checkpoint(args):  # a checkpoint directory without --input-shape: disk to disk
        print(prune_checkpoint_and_report(args))
        return 0
    options = PruneOptions.build(**given_options(args))
    torch.manual_seed(options.seed)
    model = load_model(args.spec)
    inputs = random_or_saved_inputs(model, args.input_shape, options.seed)
    # on stderr when it is a terminal (disable=None), cleared when done
    with stage_bar(not args.no_progress, 5, "fxprune", file=sys.stderr, postfix="prune", disable=None) as step:
        text = _prune_and_write(args, model, inputs, step)
    print(text)
    if _is_hf(model) or args.output == "module":
        from fxprune.cli import hf, module
        print(f"wrote {args.out}/: {hf.FILES if _is_hf(model) else module.FILES}")
        return 0
    print(f"wrote {args.out}/: plan.json model.safetensors module.py summary.md"
          + ("" if args.no_chart else " widths.png") + (f" model{_suffix(args.to)}" if args.to else ""))
    return 0


def _check_deploy(to: Optional[str], quantize: Optional[str]) -> None:
    if quantize and not to:
        raise CliError("--quantize needs --to executorch or --to onnx (it quantizes the deployed artefact)")
    if to:
        from fxprune.deploy import require
        require(to)


def _suffix(to: str) -> str:
    from fxprune.deploy import SUFFIX
    return SUFFIX[to]


def _deploy(args: argparse.Namespace, result, inputs: tuple, calibration) -> tuple[Optional[bytes], str]:
    """The artefact's bytes and the lines to print, built (and run in its runtime) before anything is
    written."""
    if not args.to:
        return None, ""
    import warnings
    from fxprune.deploy import build
    with warnings.catch_warnings():  # the calibration note is printed below, not warned twice
        warnings.simplefilter("ignore", UserWarning)
        data, deployed = build(result, inputs, args.to, quantize=args.quantize, calibration=calibration)
    lines = [f"model{_suffix(args.to)}{deployed}"]  # str(deployed) starts with its (empty) file name
    lines += [f"note: {n}" for n in deployed.notes]
    return data, "\n".join(lines)


def _prune_and_write(args: argparse.Namespace, model: Any, inputs: tuple, step: Callable[[str], None]) -> str:
    import fxprune
    from fxprune.measure import count_macs, count_params
    if _is_hf(model):  # a PreTrainedModel in, a PreTrainedModel out (fxprune.hf)
        from fxprune.cli.hf import prune_and_write
        return prune_and_write(args, model, inputs)
    options = PruneOptions.build(**given_options(args))
    if args.output == "module":  # the model's own class back (fxprune.module)
        from fxprune.cli.module import prune_and_write as write_module
        return write_module(args, model, inputs, options)
    calibration, loss_fn = calibration_data(args, options.criterion)
    result = fxprune.prune(model, inputs, options=options, calibration=calibration, loss_fn=loss_fn)
    step("verify")
    report = fxprune.verify(model, result, inputs)
    artefact, deployed = _deploy(args, result, inputs, calibration)
    step("count")
    original = model.module() if isinstance(model, torch.export.ExportedProgram) else model
    summary = Summary(_group_rows(result.plan),
                      (count_params(original), count_params(result.graph_module)),
                      (count_macs(original, inputs), count_macs(result.graph_module, inputs)), str(report),
                      tuple(ungrouped_lines(result.plan.ungrouped)))
    step("save")
    text = summary.markdown(f"{args.spec}, sparsity {format_sparsity(options.sparsity)}, {options.criterion}, "
                            f"{result.level} level")
    if artefact is not None:
        text = f"{text}\n{deployed}\n"
    write_output(args, result, text, artefact)
    step("done")
    return text


def write_output(args: argparse.Namespace, result, text: str, artefact: Optional[bytes]) -> None:
    """Every file of ``--out``, written into a fresh directory that replaces ``--out`` in one rename: a
    failed run leaves the previous output as it was (see :func:`fxprune.safe_files.staged_directory`)."""
    from fxprune.io import output_files, write_files
    from fxprune.safe_files import staged_directory, write_new
    with staged_directory(args.out) as out:
        write_files(out, output_files(result))
        if artefact is not None:
            write_new(out / f"model{_suffix(args.to)}", artefact)
        write_new(out / "summary.md", text.encode("utf-8"))
        if not args.no_chart:
            plot_widths(layer_widths(result), out / "widths.png", args.spec)


def calibration_data(args: argparse.Namespace, criterion: str) -> tuple[Any, Any]:
    """``(Calibration, loss_fn)`` from ``--calibration`` (a safetensors file: nothing is unpickled)."""
    if args.calibration is None:
        if criterion in DATA_CRITERIA:
            raise CliError(f"criterion {criterion!r} reads calibration data: pass --calibration "
                           f"FILE.safetensors")
        return None, None
    from safetensors.torch import load_file
    from fxprune.data.calibration import Calibration
    if not args.calibration.is_file():
        raise CliError(f"bad --calibration: no file {str(args.calibration)!r}")
    try:
        tensors = load_file(str(args.calibration))
    except Exception as exc:
        raise CliError(f"bad --calibration {str(args.calibration)!r}: not a safetensors file ({exc})") from exc
    names = ["input"] if "input" in tensors else [f"input_{i}" for i in range(len(tensors))
                                                  if f"input_{i}" in tensors]
    if not names:
        raise CliError(f"bad --calibration: no tensor 'input' or 'input_0' (it has {sorted(tensors)})")
    columns = [tensors[n] for n in names] + ([tensors["target"]] if "target" in tensors else [])
    flat = [n for n, c in zip(names + ["target"], columns) if c.dim() == 0 or c.shape[0] == 0]
    if flat:  # rows are samples: a scalar or an empty tensor has none
        raise CliError(f"bad --calibration: tensor {flat[0]!r} has no rows (shape {list(tensors[flat[0]].shape)})")
    size = args.calibration_batch_size
    batches = [tuple(c[i:i + size] for c in columns) for i in range(0, columns[0].shape[0], size)]
    loss_fn = torch.nn.functional.cross_entropy if criterion in GRADIENT_CRITERIA else None
    if loss_fn is not None and "target" not in tensors:
        raise CliError(f"criterion {criterion!r} needs a 'target' tensor in --calibration")
    inputs = tuple(range(len(names)))
    return Calibration(batches, inputs=inputs, target=-1 if "target" in tensors else None,
                       max_batches=args.max_batches), loss_fn


def _is_hf(model: Any) -> bool:
    transformers = sys.modules.get("transformers")  # loaded by an hf: SPEC or a factory returning one
    return transformers is not None and isinstance(model, transformers.PreTrainedModel)


# --- the chart --------------------------------------------------------------------------------------
def layer_widths(result) -> list[tuple[str, int, int]]:
    """(layer, width before, width after) for every producer (a conv's or linear's output dim)."""
    state = result.graph_module.state_dict()
    rows = []
    for producer in result.analysis.producers:
        before = result.analysis.tensor(producer.key).shape[producer.dim]
        after = state[producer.key].shape[producer.dim] if producer.key in state else before
        label = producer.key[:-len(".weight")] if producer.key.endswith(".weight") else producer.key
        rows.append((label, int(before), int(after)))
    return rows


def _check_chart(disabled: bool) -> None:
    if disabled:
        return
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise CliError("widths.png needs matplotlib: pip install 'fxprune[plot]', or pass --no-chart") from exc


def plot_widths(rows: list[tuple[str, int, int]], path: Path, title: str) -> None:
    """A bar chart of each layer's width before (grey) and after (blue) pruning."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    labels = [r[0] for r in rows]
    xs = range(len(rows))
    fig, ax = plt.subplots(figsize=(min(4 + 0.35 * len(rows), 40), 4.5), dpi=100)
    ax.bar([x - 0.2 for x in xs], [r[1] for r in rows], width=0.4, color="#bbbbbb", label="before")
    ax.bar([x + 0.2 for x in xs], [r[2] for r in rows], width=0.4, color="#1f77b4", label="after")
    ax.set_xticks(list(xs), labels, rotation=90, fontsize=7)
    ax.set_ylabel("output channels")
    ax.set_title(f"{title}: per-layer width")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)


# --- inspect ------------------------------------------------------------------------------------------
def run_inspect(args: argparse.Namespace) -> int:
    import fxprune
    options = PruneOptions.build(**given_options(args))
    torch.manual_seed(options.seed)
    model = load_model(args.spec)
    inputs = random_or_saved_inputs(model, args.input_shape, options.seed)
    analysis = fxprune.analyze(model, inputs, options.capture)
    groups = analysis.groups
    prunable = sum(g.prunable for g in groups)
    print(f"{args.spec} ({analysis.level} level): {len(groups)} groups, {prunable} prunable")
    rows = [("group", "units", "members", "state")]
    for g in groups:
        rows.append((g.name, str(g.size), str(len(g.members)), _state(g)))
    print("\n".join(_table(rows)))
    for line in ungrouped_lines(ungrouped(analysis)):
        print(line)
    frozen = [g for g in groups if g.frozen_units]
    for g in frozen:
        print(f"{g.name}: {len(g.frozen_units)} of {g.size} units frozen: {'; '.join(g.reasons) or '?'}")
    return 0


def _state(group) -> str:
    if not group.prunable:
        return "frozen"
    state = "exact" if group.exact else "approximate"
    return f"{state}, {len(group.frozen_units)} frozen" if group.frozen_units else state


# --- main -----------------------------------------------------------------------------------------------
def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``fxprune`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return run_prune(args) if args.command == "prune" else run_inspect(args)
    except (CliError, FxPruneError) as exc:
        message = " ".join(str(exc).split())  # one line, whatever the error's text
        print(f"fxprune: error: {message}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `fxprune inspect ... | head`: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
