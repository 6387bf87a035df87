"""Hostile and careless inputs (issue 17): the files, specs and calls an adversarial probe tried, each
with the typed error it must get. ``CASES`` rows are rows of the README's bad-input table (see
``benchmarks/bad_inputs.py``); each ``call`` takes a fresh directory to build its files in.

The builders (``dynamic_pt2``, ``rewrite_pt2``, ``saved_result``) are shared with the fuzz tests.
"""
from __future__ import annotations

import json
import os
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

import fxprune
from fxprune import errors

X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 4, 3, padding=1)).eval()


# --- builders ------------------------------------------------------------------------------------------
def dynamic_pt2(directory: Path) -> Path:
    """A real ``.pt2`` of a small model exported with a dynamic batch: its ``model.json`` holds SymInt
    expressions (``Symbol('s..', positive=True, integer=True)``) that ``torch.export.load`` sympifies."""
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU()).eval()
    batch = torch.export.Dim("batch")
    program = torch.export.export(model, (torch.randn(2, 4),), dynamic_shapes=({0: batch},))
    path = directory / "dynamic.pt2"
    torch.export.save(program, path)
    return path


def rewrite_pt2(src: Path, dst: Path, edits: dict[str, Callable[[bytes], bytes]],
                before: dict[str, bytes] | None = None) -> Path:
    """Copy a ``.pt2`` with some entries edited (by name suffix); ``before`` writes an extra first copy of
    an entry ahead of the real one (a duplicated name)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # zipfile warns about the duplicate it writes
        for info in zin.infolist():
            data = zin.read(info.filename)
            for suffix, first in (before or {}).items():
                if info.filename.endswith(suffix):
                    zout.writestr(info.filename, first)
            edit = next((e for s, e in edits.items() if info.filename.endswith(s)), None)
            zout.writestr(info, edit(data) if edit else data)
    return dst


def inject(marker: Path) -> Callable[[bytes], bytes]:
    """Edit every SymInt expression so that sympify creates ``marker`` (then multiplies None: an error)."""
    payload = f" + 0*__import__('pathlib').Path({str(marker)!r}).touch()"

    def edit(data: bytes) -> bytes:
        text = json.dumps(json.loads(data))
        symbol = re.search(r'"expr_str": "(Symbol\([^"]*\))"', text).group(1)
        return text.replace(f'"{symbol}"', json.dumps(symbol + payload)).encode()
    return edit


PICKLED_CONFIG = json.dumps({"config": {"0.weight": {"path_name": "payload", "is_param": True,
                                                      "use_pickle": True, "tensor_meta": None}}}).encode()


def sympy_payload_pt2(tmp: Path) -> Path:
    return rewrite_pt2(dynamic_pt2(tmp), tmp / "bad.pt2", {"models/model.json": inject(tmp / "PWNED")})


def duplicated_pt2(tmp: Path) -> Path:
    return rewrite_pt2(dynamic_pt2(tmp), tmp / "dup.pt2", {},
                       before={"data/weights/model_weights_config.json": PICKLED_CONFIG})


def edited_fqn_pt2(tmp: Path) -> Path:
    """The root module's path edited: torch.export.load succeeds, the program's module() fails."""
    edit = {"models/model.json": lambda data: data.replace(b'"fqn": ""', b'"fqn": "x"', 1)}
    return rewrite_pt2(dynamic_pt2(tmp), tmp / "fqn.pt2", edit)


def saved_result(tmp: Path) -> Path:
    directory = tmp / "saved"
    fxprune.save(fxprune.prune(small_model(), (X,), sparsity=0.5), directory)
    return directory


def _edit_plan(tmp: Path, edit: Callable[[dict], Any]) -> Any:
    directory = saved_result(tmp)
    data = json.loads((directory / "plan.json").read_text())
    edit(data)
    (directory / "plan.json").write_text(json.dumps(data, ensure_ascii=False))
    return fxprune.load(directory, small_model(), (X,))


def _kernel_dim(data: dict) -> None:
    data["kept_indices"]["3.weight"] = {"1": data["kept_indices"]["3.weight"]["1"], "2": [1]}


def _unicode_dim(data: dict) -> None:
    data["kept_indices"]["3.weight"] = {"\u0663": [1]}  # ARABIC-INDIC DIGIT THREE: str.isdigit() is True


def _deep_options(tmp: Path) -> Any:
    data = json.loads(fxprune.prune(small_model(), (X,), 0.5).plan.to_json())
    data["options"]["hf"] = json.loads('{"a": ' * 900 + "1" + "}" * 900)
    return fxprune.Plan.from_json(json.dumps(data))


def _special_plan(tmp: Path, kind: str) -> Any:
    directory = saved_result(tmp)
    (directory / "plan.json").unlink()
    if kind == "fifo":
        os.mkfifo(directory / "plan.json")
    else:
        (directory / "plan.json").symlink_to("/dev/zero")
    return fxprune.load(directory, small_model(), (X,))


def _deep_metadata(tmp: Path) -> Any:
    from safetensors.torch import save_file
    directory = saved_result(tmp)
    from fxprune.io import read_safetensors
    state, _ = read_safetensors(directory / "model.safetensors")
    deep = "[" * 100_000 + "]" * 100_000
    save_file({k: v.contiguous() for k, v in state.items()}, str(directory / "model.safetensors"),
              metadata={"fxprune": deep})
    return fxprune.load(directory, small_model(), (X,))


def _remote_code_repo(tmp: Path) -> Any:
    from fxprune.cli.hf import load
    config = dict(model_type="fxprune_evil", architectures=["EvilModel"],
                  auto_map={"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"})
    (tmp / "config.json").write_text(json.dumps(config))
    (tmp / "evil.py").write_text(f"from pathlib import Path\nPath({str(tmp / 'PWNED')!r}).touch()\n")
    return load(str(tmp))


def _hf_architecture(tmp: Path, name: str) -> Any:
    import transformers
    from fxprune.cli.hf import load
    config = transformers.LlamaConfig(vocab_size=100, hidden_size=16, intermediate_size=32,
                                      num_hidden_layers=1, num_attention_heads=2).to_dict()
    config["architectures"] = [name]
    (tmp / "config.json").write_text(json.dumps(config))
    return load(str(tmp))


def _verify_with(model: Any) -> Any:
    result = fxprune.prune(small_model(), (X,), 0.5)
    return fxprune.verify(model, result, (X,))


def _out_symlink(tmp: Path) -> Any:
    (tmp / "elsewhere").mkdir()
    (tmp / "out").symlink_to(tmp / "elsewhere")
    return fxprune.save(fxprune.prune(small_model(), (X,), 0.5), tmp / "out")


def _out_foreign(tmp: Path) -> Any:
    (tmp / "out").mkdir()
    (tmp / "out" / "thesis.tex").write_text("years of work")
    return fxprune.save(fxprune.prune(small_model(), (X,), 0.5), tmp / "out")


def _out_under_file(tmp: Path) -> Any:
    (tmp / "file").write_text("x")
    return fxprune.save(fxprune.prune(small_model(), (X,), 0.5), tmp / "file" / "out")


def _bit_flipped_pte(tmp: Path) -> Any:
    from fxprune.deploy.executorch import check_pte
    return check_pte(b"<\x00\x00\x00ET12eh00" + b"\x00" * 28)  # a header, and no program


def _meta_model(tmp: Path) -> Any:
    return fxprune.prune(small_model().to("meta"), (X,), 0.5)


#: (case, call(tmp directory), error, message pattern): each a row of the README's bad-input table.
CASES: list[tuple[str, Callable[[Path], Any], type, str]] = [
    (".pt2 whose SymInt expression runs code", lambda t: fxprune.io.load_pt2(sympy_payload_pt2(t)),
     errors.UnsafeFileError, r"models/model\.json.*expr_str"),
    (".pt2 with a duplicated entry", lambda t: fxprune.io.load_pt2(duplicated_pt2(t)),
     errors.UnsafeFileError, r"model_weights_config\.json.*twice"),
    (".pt2 with an edited module path", lambda t: fxprune.io.load_pt2(edited_fqn_pt2(t)),
     errors.UnsafeFileError, r"torch\.export\.load rejects it"),
    ("hf: directory whose config maps remote code", _remote_code_repo, errors.UnsafeFileError, r"auto_map"),
    ("hf: architectures naming pipeline", lambda t: _hf_architecture(t, "pipeline"),
     errors.UnsupportedModelError, r"PreTrainedModel"),
    ("verify without the original model", lambda t: _verify_with(None), errors.InvalidOptionError,
     r"needs the original model.*NoneType"),
    ("verify against an unrelated model", lambda t: _verify_with(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1))),
     errors.PlanMismatchError, r"not the model the result was pruned from"),
    ("plan slicing a conv's kernel dim", lambda t: _edit_plan(t, _kernel_dim), errors.PlanMismatchError,
     r"dim 2 of '3\.weight'.*no channel group"),
    ("plan dim as a Unicode digit", lambda t: _edit_plan(t, _unicode_dim), errors.UnsafeFileError, r"dim"),
    ("plan options nested 900 deep", _deep_options, errors.UnsafeFileError, r"options is nested more than"),
    ("plan.json that is /dev/zero", lambda t: _special_plan(t, "zero"), errors.UnsafeFileError,
     r"not a regular file"),
    ("plan.json that is a FIFO", lambda t: _special_plan(t, "fifo"), errors.UnsafeFileError,
     r"not a regular file"),
    ("safetensors metadata nested 100000 deep", _deep_metadata, errors.UnsafeFileError, r"metadata"),
    ("calibration batch with zero rows", lambda t: fxprune.prune(
        small_model(), (X,), 0.5, criterion="activation", calibration=[(X,), (X[:0],)]),
     errors.CalibrationError, r"batch 1 .*no rows"),
    ("example input with zero rows", lambda t: fxprune.prune(small_model(), (X[:0],), 0.5),
     errors.ExampleInputError, r"no elements"),
    ("more example inputs than the forward takes", lambda t: fxprune.prune(small_model(), (X, X), 0.5),
     errors.ExampleInputError, r"2 example inputs.*takes 1"),
    ("model on the meta device", _meta_model, errors.UnsupportedModelError, r"meta device"),
    ("output directory that is a symlink", _out_symlink, errors.UnsafeFileError, r"symbolic link"),
    ("output directory holding other files", _out_foreign, errors.UnsafeFileError, r"thesis\.tex"),
    ("output path under a file", _out_under_file, errors.UnsafeFileError, r"not a writable directory"),
    (".pte cut short", _bit_flipped_pte, errors.DeployError, r"not a valid ExecuTorch program"),
]


def _calibration_scalar(tmp: Path) -> list[str]:
    from safetensors.torch import save_file
    save_file({"input": torch.tensor(1.0)}, str(tmp / "calibration.safetensors"))
    return ["prune", "torchvision:resnet18", "--input-shape", "1,3,32,32", "--criterion", "activation",
            "--calibration", str(tmp / "calibration.safetensors"), "--out", str(tmp / "out"), "--no-chart"]


#: (case, argv(tmp directory), stderr pattern): the command exits 2 with one line, writing nothing.
CLI_CASES: list[tuple[str, Callable[[Path], list[str]], str]] = [
    ("--calibration holding a scalar", _calibration_scalar, r"bad --calibration: tensor 'input' has no rows"),
    ("--input-shape of 10**30 elements", lambda t: ["inspect", "torchvision:resnet18", "--input-shape",
                                                   "1" + "0" * 30 + ",3"], r"bad shape .*elements"),
    ("--out that is an existing file", lambda t: (t / "file").write_text("x") and [
        "prune", "torchvision:resnet18", "--input-shape", "1,3,32,32", "--out", str(t / "file")],
     r"exists and is not a directory"),
    ("--out under /proc", lambda t: ["prune", "torchvision:resnet18", "--input-shape", "1,3,32,32", "--out",
                                     "/proc/self/fxprune-out"], r"not a writable directory"),
]
