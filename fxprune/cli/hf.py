"""``fxprune prune hf:PATH_OR_CONFIG ... --out DIR``: the command line's HuggingFace route.

``PATH_OR_CONFIG`` is a model directory (``config.json`` and safetensors weights, as ``save_pretrained``
writes it; a directory with only ``config.json``, or a ``config.json`` file, gives random weights). The
class is the config's first ``architectures`` entry, which must name a ``transformers.PreTrainedModel``
subclass. Weights load from safetensors only (nothing is unpickled), and a repository's own code
(``auto_map``) is never run: every transformers call passes ``trust_remote_code=False``. ``--out`` becomes a directory ``from_pretrained`` loads, plus ``plan.json`` and ``summary.md``.

    fxprune prune hf:tiny-llama/ --input-shape 2,16 --sparsity 0.5 --out pruned/

A checkpoint directory without ``--input-shape`` is pruned disk to disk (nothing but one layer's tensors
in memory; :func:`fxprune.hf.prune_checkpoint`), with a data-free criterion; rerun after an
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
from fxprune.errors import UnsafeFileError, UnsupportedModelError
from fxprune.safe_files import staged_directory, write_new

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
    _refuse_remote_code(config_file, path_text)
    try:
        config = transformers.AutoConfig.from_pretrained(str(config_file.parent if path.is_dir() else config_file),
                                                         trust_remote_code=False)
    except Exception as exc:  # not a config transformers understands
        raise CliError(f"bad SPEC hf:{path_text}: {type(exc).__name__}: {str(exc)[:200]}") from exc
    cls = _model_class(transformers, config, path_text)  # after the config: transformers knows the model type
    if path.is_dir() and any(path.glob("*.safetensors")):
        return cls.from_pretrained(str(path), use_safetensors=True, trust_remote_code=False).eval()
    return cls(config).eval()


def _refuse_remote_code(config_file: Path, path_text: str) -> None:
    """A config whose ``auto_map`` names the repository's own classes asks to run its code: refused
    before transformers reads it (it would prompt, and run the code on ``y``)."""
    from fxprune.safe_files import loads_json, read_bounded
    config = loads_json(read_bounded(config_file, what="config"), str(config_file))
    if not isinstance(config, dict):
        raise UnsafeFileError(f"bad SPEC hf:{path_text}: {config_file} is not a JSON object")
    if "auto_map" in config:
        raise UnsafeFileError(f"bad SPEC hf:{path_text}: {config_file} maps its classes to the repository's "
                              f"own code (auto_map); fxprune never runs remote code")


def _model_class(transformers: Any, config: Any, path_text: str) -> Any:
    """The class ``architectures[0]`` names: only a ``PreTrainedModel`` subclass transformers exports (not
    ``pipeline``, an ``Auto`` factory or ``__class__``)."""
    names = getattr(config, "architectures", None) or []
    name = names[0] if isinstance(names, (list, tuple)) and names and isinstance(names[0], str) else None
    cls = getattr(transformers, name, None) if name and name.isidentifier() and not name.startswith("_") else None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise UnsupportedModelError(f"bad SPEC hf:{path_text}: its config's 'architectures' must name a transformers "
                       f"PreTrainedModel class (got {names!r:.200})")
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
    result = hf.prune_with_result(model, inputs, progress=not args.no_progress,
                                  calibration=calibration(args, inputs), **given_options(args))
    text = summary(args.spec, result.plan.options, model, result)
    with staged_directory(args.out) as out:  # all or nothing, as fxprune.save
        result.model.save_pretrained(out)
        write_new(out / "plan.json", result.plan.to_json().encode("utf-8"))
        write_new(out / "summary.md", text.encode("utf-8"))
    return text


def calibration(args: argparse.Namespace, inputs: tuple) -> Any:
    """``--calibration`` for a HF model: a text file (``.txt``), tokenised with the model's own tokenizer
    into windows as long as the example's sequence, ``--calibration-batch-size`` per batch; or a
    safetensors file of token ids (``input``), as for any model.

    >>> # fxprune prune hf:./smollm2 --calibration notes.txt --criterion wanda --out pruned/   # doctest: +SKIP
    """
    path = getattr(args, "calibration", None)
    if path is None:
        return None
    if not Path(path).is_file():
        raise CliError(f"bad --calibration: no file {str(path)!r}")
    length, size = int(inputs[0].shape[-1]), args.calibration_batch_size
    if Path(path).suffix != ".txt":  # token ids ('input'): plain id batches, checked by fxprune.hf
        windows = _token_ids(Path(path))
    else:
        tokenizer = _tokenizer(args.spec.partition(":")[2], path)
        ids = torch.tensor(tokenizer(Path(path).read_text(encoding="utf-8"))["input_ids"])
        windows = ids[:ids.numel() // length * length].view(-1, length)
    if not windows.shape[0]:
        raise CliError(f"bad --calibration: {str(path)!r} holds fewer tokens than one window of {length} "
                       f"(the example's sequence length)")
    batches = [windows[i:i + size] for i in range(0, windows.shape[0], size)]
    return batches[:args.max_batches] if args.max_batches else batches


def _tokenizer(model_dir: str, path: Any) -> Any:
    """The model's own tokenizer, which a text calibration file needs; a typed error where it has none."""
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError, TypeError) as exc:  # transformers' ways of saying it found no tokenizer
        raise CliError(f"bad --calibration {str(path)!r}: a text file is tokenised with the model's tokenizer, and "
                       f"{model_dir!r} has none that loads ({str(exc).strip().splitlines()[0]}); save the "
                       f"tokenizer beside the model, or pass a safetensors file of token ids ('input')") from exc


def _token_ids(path: Path) -> torch.Tensor:
    """The ``input`` tensor of a safetensors file (rows of token ids)."""
    from fxprune.io import read_safetensors
    try:
        tensors = read_safetensors(path)[0]
    except Exception as exc:
        raise CliError(f"bad --calibration {str(path)!r}: not a safetensors file ({exc})") from exc
    if "input" not in tensors:
        raise CliError(f"bad --calibration: no tensor 'input' of token ids (it has {sorted(tensors)})")
    return tensors["input"]


#: Run flags this route does not take yet: (flag, its value when not given).
UNSUPPORTED_FLAGS = {"to": None, "quantize": None}


def refuse_unsupported_flags(args: argparse.Namespace) -> None:
    """A flag the ``hf:`` route cannot honour is an error, never ignored (the option flags are checked
    by :func:`fxprune.hf.prune_with_result` itself)."""
    for name, unset in UNSUPPORTED_FLAGS.items():
        if getattr(args, name, unset) != unset:
            raise CliError(f"--{name.replace('_', '-')} is not supported for hf: SPECs (fxprune.hf writes a "
                           f"from_pretrained directory)")


def summary(spec: str, options: Any, model: Any, result: Any) -> str:
    rows = [("config field", "before", "after")]
    rows += [(field, str(before), str(after)) for field, (before, after) in result.changes.items()]
    before, after = model.num_parameters(), result.model.num_parameters()
    budget = f", target {format_sparsity(dict(options.target))}" if options.target is not None else ""
    lines = [f"# fxprune: {spec}, sparsity {format_sparsity(options.sparsity)}{budget}, HF-compatible", "",
             *_table(rows), "",
             f"params: {before:,} -> {after:,} ({after / before:.1%})",
             f"HF model vs pruned graph: max abs error {result.max_abs_error:.3g}", "",
             *_budget_lines(result.model.config.fxprune.get("budget"))]
    return "\n".join(lines)


def _budget_lines(record: Optional[dict]) -> list[str]:
    """The mixes a ``--target`` tried, each with its loss, the chosen one (the lowest) marked."""
    if not record:
        return []
    best = min(t["loss"] for t in record["tried"])
    rows = [("layers removed", "experts removed", "MLP widths removed", "repairs", "kept", "loss", "")]
    rows += [(str(t["layers"]), str(t["experts"]), ", ".join(f"{k} {v:.3f}" for k, v in t["width"].items()),
              str(t["repairs"]), f"{t['achieved']:.3f}", f"{t['loss']:.4f}", "chosen" if t["loss"] == best else "")
             for t in record["tried"]]
    (kind, fraction), = record["target"].items()
    return [f"budget: {kind} {fraction}, achieved {record['achieved']:.3f} ({record['counted']}); ranked by "
            f"{record['scored']}", "", *_table(rows), ""]

