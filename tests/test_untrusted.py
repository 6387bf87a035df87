"""Plans and saved files from an untrusted source cannot execute code (promise 6).

Malicious plan JSON -- object hooks (``__class__``, ``__reduce__``, jsonpickle's ``py/object``), huge
numbers, wrong types, nesting deep enough to blow the parser's stack, pickle bytes -- is refused by
:meth:`fxprune.Plan.from_json` and by :func:`fxprune.load` with :class:`~fxprune.errors.UnsafeFileError`.
A real ``torch.save`` file whose payload's ``__reduce__`` would create a marker file is refused wherever
fxprune reads a file (the tensors, the plan, a ``.pt2``), and the marker is never created: nothing is
unpickled, and ``module.py`` beside a saved model is never executed by ``fxprune.load``.
"""
from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Callable

import pytest
import torch
from torch import nn

import fxprune
from fxprune import io as fio
from fxprune.errors import UnsafeFileError
from fxprune.core.plan import FORMAT, Plan

X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 4, 3, padding=1)).eval()


def _plan() -> dict:
    return json.loads(fxprune.prune(small_model(), (X,), sparsity=0.5).plan.to_json())


def _key(data: dict) -> str:
    return next(iter(data["kept_indices"]))


def _set_index(value) -> Callable[[dict], None]:
    return lambda d: d["kept_indices"][_key(d)].update({"0": [value]})


# Each edit turns a valid plan (a dict) into a malicious one; a str result replaces the whole text.
MALICIOUS = {
    "__class__ hook at top level": lambda d: {"__class__": "os.system", "args": ["touch pwned"]},
    "__reduce__ beside the plan": lambda d: d.update({"__reduce__": ["os.system", ["touch pwned"]]}),
    "py/object hook as kept_indices": lambda d: d.update({"kept_indices": {"py/object": "os.system"}}),
    "py/reduce hook in a group": lambda d: d["groups"][0].update({"py/reduce": [{"py/function": "os.system"}]}),
    "$type hook as a shape": lambda d: d["shapes"].update({_key(d): {"$type": "System.Diagnostics.Process"}}),
    "index 1e999 (inf)": lambda d: json.dumps(d).replace('"0": [', '"0": [1e999, ', 1),
    "index NaN": lambda d: json.dumps(d).replace('"0": [', '"0": [NaN, ', 1),
    "index 10**100": _set_index(10 ** 100),
    "index of 5000 digits": lambda d: json.dumps(d).replace('"0": [', '"0": [' + "9" * 5000 + ", ", 1),
    "negative index": _set_index(-1),
    "index as a string": _set_index("1"),
    "index as a float": _set_index(1.0),
    "index as a bool": _set_index(True),
    "index as an object": _set_index({"__class__": "int"}),
    "dim not a number": lambda d: d["kept_indices"].update({_key(d): {"zero": [0]}}),
    "negative dim": lambda d: d["kept_indices"].update({_key(d): {"-1": [0]}}),
    "shape as a string": lambda d: d["shapes"].update({_key(d): "8333"}),
    "kept_indices a list": lambda d: d.update({"kept_indices": [["conv.weight", [0]]]}),
    "groups an object": lambda d: d.update({"groups": {"name": "x"}}),
    "group size a string": lambda d: d["groups"][0].update({"size": "8"}),
    "group exact a string": lambda d: d["groups"][0].update({"exact": "yes"}),
    "wrong format": lambda d: d.update({"format": "pickle/4"}),
    "no format": lambda d: d.pop("format"),
    "a JSON list": lambda d: "[1, 2, 3]",
    "a JSON string": lambda d: '"fxprune.plan/1"',
    "nested 100000 deep": lambda d: "[" * 100_000 + "]" * 100_000,
    "kept_indices nested 50000 deep": lambda d: json.dumps(d).replace(
        '"kept_indices": {', '"kept_indices": {"a": ' + '{"a": ' * 50_000 + "0" + "}" * 50_000 + ", ", 1),
    "pickle protocol 0 text": lambda d: "cos\nsystem\n(S'touch pwned'\ntR.",
    "not UTF-8": lambda d: b"\xff\xfe\x00{",
}


def _text(edit: Callable) -> str | bytes:
    data = _plan()
    out = edit(data)
    return out if isinstance(out, (str, bytes)) else json.dumps(out if out is not None else data)


@pytest.mark.parametrize("edit", MALICIOUS.values(), ids=MALICIOUS.keys())
def test_plan_from_json_refuses_malicious_json(edit) -> None:
    with pytest.raises(UnsafeFileError):
        Plan.from_json(_text(edit))


def test_plan_from_json_refuses_bytes_of_a_pickle(marker: Path) -> None:
    with pytest.raises(UnsafeFileError):
        Plan.from_json(pickle.dumps(_Payload(marker), protocol=2))
    assert not marker.exists()


def test_options_are_checked_data() -> None:
    """``options`` are the plan's PruneOptions: an unknown field (an object hook) or a field of the wrong
    type is refused with the field's name, and nothing is ever read as code."""
    data = _plan()
    data["options"]["hook"] = {"__class__": "os.system", "py/object": "os.system"}
    with pytest.raises(UnsafeFileError, match="unknown plan option 'hook'"):
        Plan.from_json(json.dumps(data))
    data = _plan()
    data["options"]["capture"] = {"__class__": "os.system"}
    with pytest.raises(UnsafeFileError, match="plan option 'capture' has the wrong type"):
        Plan.from_json(json.dumps(data))
    plan = Plan.from_json(json.dumps(_plan()))
    assert Plan.from_json(plan.to_json()) == plan


# --- files: a real torch.save file carrying a __reduce__ payload ------------------------------------
class _Payload:
    """Unpickling this object creates ``path`` (instead of running a shell, which a test must not)."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    path = tmp_path / "PWNED"
    yield path
    assert not path.exists(), "a payload ran: something unpickled an untrusted file"


@pytest.fixture
def poisoned(tmp_path: Path, marker: Path) -> Path:
    """A ``torch.save`` archive (zip + pickle) whose unpickling would create the marker file."""
    path = tmp_path / "poisoned.pt"
    torch.save({"weight": torch.zeros(2), "payload": _Payload(marker)}, path)
    return path


def test_the_payload_is_real(poisoned: Path, marker: Path) -> None:
    """The control: ``torch.load(weights_only=False)`` would run it (on a copy of the path's name)."""
    torch.load(poisoned, weights_only=False)
    assert marker.exists()
    marker.unlink()


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    directory = tmp_path / "saved"
    fxprune.save(fxprune.prune(small_model(), (X,), sparsity=0.5), directory)
    return directory


@pytest.mark.parametrize("target", ["model.safetensors", "plan.json"])
def test_load_refuses_a_torch_save_file_in_place_of_a_saved_file(saved: Path, poisoned: Path, marker: Path,
                                                                  target: str) -> None:
    (saved / target).write_bytes(poisoned.read_bytes())
    with pytest.raises(UnsafeFileError, match=target.replace(".", r"\.")):
        fxprune.load(saved, small_model(), (X,))
    assert not marker.exists()


def test_load_refuses_a_raw_pickle_in_place_of_the_tensors(saved: Path, marker: Path) -> None:
    (saved / "model.safetensors").write_bytes(pickle.dumps(_Payload(marker), protocol=4))
    with pytest.raises(UnsafeFileError, match="model.safetensors"):
        fxprune.load(saved, small_model(), (X,))
    assert not marker.exists()


@pytest.mark.parametrize("edit", [MALICIOUS["__class__ hook at top level"], MALICIOUS["index 1e999 (inf)"],
                                  MALICIOUS["nested 100000 deep"], MALICIOUS["index as a string"]],
                         ids=["class hook", "inf", "deep", "string index"])
def test_load_refuses_a_malicious_plan_file(saved: Path, edit) -> None:
    data = json.loads((saved / "plan.json").read_text())
    out = edit(data)
    (saved / "plan.json").write_text(out if isinstance(out, str) else json.dumps(out if out is not None else data))
    with pytest.raises(UnsafeFileError, match="plan"):
        fxprune.load(saved, small_model(), (X,))


def test_load_never_runs_module_py(saved: Path, marker: Path) -> None:
    """``module.py`` is for users who choose to run it; ``fxprune.load`` reads only data files."""
    (saved / "module.py").write_text(f"from pathlib import Path\nPath({str(marker)!r}).touch()\n")
    result = fxprune.load(saved, small_model(), (X,))
    assert result.graph_module(X).shape == small_model()(X).shape
    assert not marker.exists()


def test_load_pt2_refuses_a_torch_save_file(poisoned: Path, marker: Path, tmp_path: Path) -> None:
    target = tmp_path / "model.pt2"
    target.write_bytes(poisoned.read_bytes())
    with pytest.raises(UnsafeFileError, match="model.pt2"):
        fio.load_pt2(target)
    assert not marker.exists()
