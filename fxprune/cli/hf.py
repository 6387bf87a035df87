"""``fxprune prune hf:PATH_OR_CONFIG ... --out DIR``: the command line's HuggingFace route.

``PATH_OR_CONFIG`` is a model directory (``config.json`` and safetensors weights, as ``save_pretrained``
writes it; a directory with only ``config.json``, or a ``config.json`` file, gives random weights). The
class is the config's first ``architectures`` entry. Weights load from safetensors only (nothing is
unpickled). ``--out`` becomes a directory ``from_pretrained`` loads, plus ``plan.json`` and ``summary.md``.

    fxprune prune hf:tiny-llama/ --input-shape 2,16 --sparsity 0.5 --out pruned/

A checkpoint directory without ``--input-shape`` is pruned disk to disk (nothing but one layer's tensors
in memory; :func:`fxprune.hf.checkpoint.prune_checkpoint`), with a data-free criterion; rerun after an
interruption, the same command continues from the last finished layer:

    fxprune prune hf:llama-8b/ --sparsity 0.25 --criterion l2 --out llama-8b-p25/
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from fxprune.cli.flags import given_options
from fxprune.cli.format import CliError, format_sparsity, markdown_table as _table

FILES = "config.json model.safetensors plan.json summary.md"


def is_checkpoint(args: argparse.Namespace) -> bool:
    """``hf:DIR`` of a directory holding safetensors, with no ``--input-shape``: the disk-to-disk route."""
    source, _, name = args.spec.partition(":")
    path = Path(name)
    return source == "hf" and not args.input_shape and path.is_dir() and any(path.glob("*.safetensors"))


def prune_checkpoint_and_report(args: argparse.Namespace) -> str:
    """Prune ``hf:DIR`` disk to disk into ``--out``; the lines to print."""
    from fxprune.hf.checkpoint import REPORT, STREAMING_CRITERIA, prune_checkpoint
    refuse_unsupported_flags(args)
    options = given_options(args)
    if options.get("criterion") is not None and options["criterion"] not in STREAMING_CRITERIA:
        raise CliError(f"--criterion {options['criterion']} reads calibration data; the disk-to-disk route "
                       f"offers {', '.join(STREAMING_CRITERIA)}")
    report = prune_checkpoint(args.spec.partition(":")[2], args.out, progress=not args.no_progress, **options)
    config = json.loads((Path(args.out) / "config.json").read_text(encoding="utf-8"))
    rows = [("config field", "before", "after")]
    rows += [(field, str(a), str(b)) for field, (a, b) in config["fxprune"]["changes"].items()]
    seconds = report["timings"]["total_s"]
    sparsity = format_sparsity(config["fxprune"]["options"]["sparsity"])
    return "\n".join([f"# fxprune: {args.spec}, sparsity {sparsity}, disk to disk", "", *_table(rows), "",
                      f"read {report['bytes_read'] / 1e9:.2f} GB, wrote {report['bytes_written'] / 1e9:.2f} GB "
                      f"in {seconds:.1f} s ({report['resumed_units']} layers resumed)",
                      f"wrote {args.out}/: config.json, {len(report['units'])} shards, "
                      f"model.safetensors.index.json, plan.json, {REPORT}"])


def load(path_text: str) -> Any:
    """The model an ``hf:`` SPEC names, in eval mode (random weights from the global seed)."""
    import transformers
    path = Path(path_text)
    config_file = path / "config.json" if path.is_dir() else path
    if not config_file.is_file():
        raise CliError(f"bad SPEC hf:{path_text}: no config.json there")
    try:
        config = transformers.AutoConfig.from_pretrained(str(config_file.parent if path.is_dir() else config_file))
    except Exception as exc:  # not a config transformers understands
        raise CliError(f"bad SPEC hf:{path_text}: {type(exc).__name__}: {str(exc)[:200]}") from exc
    cls = _model_class(transformers, config, path_text)
    if path.is_dir() and any(path.glob("*.safetensors")):
        return cls.from_pretrained(str(path), use_safetensors=True).eval()
    return cls(config).eval()


def _model_class(transformers: Any, config: Any, path_text: str) -> Any:
    names = getattr(config, "architectures", None) or []
    cls = getattr(transformers, names[0], None) if names else None
    if cls is None:
        raise CliError(f"bad SPEC hf:{path_text}: its config names no transformers class in "
                          f"'architectures' (got {names})")
    return cls


def random_hf_inputs(model: Any, shapes: Optional[Sequence[tuple[int, ...]]], seed: int) -> tuple:
    """Random inputs of ``--input-shape``: token ids below the vocabulary size for a model whose main
    input is ``input_ids``, normal floats otherwise (``pixel_values``)."""
    if not shapes:
        raise CliError("--input-shape is required (e.g. --input-shape 2,16 for token ids)")
    generator = torch.Generator().manual_seed(seed)
    if getattr(model, "main_input_name", "") == "input_ids":
        vocab = int(model.config.vocab_size)
        return tuple(torch.randint(0, vocab, s, generator=generator) for s in shapes)
    return tuple(torch.randn(s, generator=generator) for s in shapes)


def prune_and_write(args: argparse.Namespace, model: Any, inputs: tuple) -> str:
    """Prune with :func:`fxprune.hf.prune_with_result` and write ``--out``; returns the summary text."""
    from fxprune import hf
    refuse_unsupported_flags(args)
    result = hf.prune_with_result(model, inputs, progress=not args.no_progress, **given_options(args))
    out = Path(args.out)
    result.model.save_pretrained(out)
    (out / "plan.json").write_text(result.plan.to_json(), encoding="utf-8")
    text = summary(args.spec, result.plan.options.sparsity, model, result)
    (out / "summary.md").write_text(text, encoding="utf-8")
    return text


#: Run flags this route does not take yet: (flag, its value when not given).
UNSUPPORTED_FLAGS = {"calibration": None, "to": None, "quantize": None, "calibration_batch_size": 32,
                     "max_batches": None}


def refuse_unsupported_flags(args: argparse.Namespace) -> None:
    """A flag the ``hf:`` route cannot honour is an error, never ignored (the option flags are checked
    by :func:`fxprune.hf.prune_with_result` itself)."""
    for name, unset in UNSUPPORTED_FLAGS.items():
        if getattr(args, name, unset) != unset:
            raise CliError(f"--{name.replace('_', '-')} is not supported for hf: SPECs (fxprune.hf writes a "
                           f"from_pretrained directory)")


def summary(spec: str, sparsity: Any, model: Any, result: Any) -> str:
    rows = [("config field", "before", "after")]
    rows += [(field, str(before), str(after)) for field, (before, after) in result.changes.items()]
    before, after = model.num_parameters(), result.model.num_parameters()
    lines = [f"# fxprune: {spec}, sparsity {format_sparsity(sparsity)}, HF-compatible", "", *_table(rows), "",
             f"params: {before:,} -> {after:,} ({after / before:.1%})",
             f"HF model vs pruned graph: max abs error {result.max_abs_error:.3g}", ""]
    return "\n".join(lines)

