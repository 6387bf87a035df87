"""Save and load without pickle: plan.json + model.safetensors + module.py, the .pt2 route, bad files."""
from __future__ import annotations

import importlib.util
import json
import pickle
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors.torch import load_file, save_file
from torch import nn

import fxprune
from fxprune import io as fio
from fxprune.errors import PlanMismatchError, UnsafeFileError, UnsupportedModelError

X = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def resnet18() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18().eval()


@pytest.fixture(scope="module", params=["fx", pytest.param("export", marks=pytest.mark.slow)])
def saved(request, tmp_path_factory) -> tuple[fxprune.PruneResult, Path]:
    result = fxprune.prune(resnet18(), (X,), sparsity=0.5, capture=request.param)
    directory = tmp_path_factory.mktemp(f"saved_{request.param}")
    fxprune.save(result, directory)
    return result, directory


def _import_module(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _refuse(*args, **kwargs):
    raise AssertionError("something tried to unpickle")


class _RefusingUnpickler(pickle.Unpickler):
    load = _refuse


@pytest.fixture
def no_unpickling(monkeypatch):
    """Any call into pickle's loaders or torch.load fails the test."""
    monkeypatch.setattr(pickle, "Unpickler", _RefusingUnpickler)
    monkeypatch.setattr(pickle, "load", _refuse)
    monkeypatch.setattr(pickle, "loads", _refuse)
    monkeypatch.setattr(torch, "load", _refuse)


def test_save_writes_plain_files(saved) -> None:
    result, directory = saved
    assert sorted(p.name for p in directory.iterdir()) == ["README.md", "model.safetensors", "module.py",
                                                            "plan.json"]
    assert fxprune.Plan.from_json((directory / "plan.json").read_text()) == result.plan
    assert not (directory / "model.safetensors").read_bytes().startswith((b"\x80", b"PK"))
    state = load_file(directory / "model.safetensors")
    assert state.keys() == result.graph_module.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in result.graph_module.state_dict().items())
    source = (directory / "module.py").read_text()
    assert "import fxprune" not in source and "from fxprune" not in source
    assert "torch.load" not in source and "pickle" not in source


def test_load_rebuilds_the_result_with_the_saved_tensors(saved, tmp_path, no_unpickling) -> None:
    result, directory = saved
    _copy(directory, tmp_path)
    state = load_file(directory / "model.safetensors")
    state["fc.bias"] = state["fc.bias"] + 1.0  # as if fine-tuned after pruning: load must take these
    save_file(state, tmp_path / "model.safetensors")
    again = fxprune.load(tmp_path, resnet18(), (X,))
    assert again.plan == result.plan and again.level == result.level
    assert again.graph_module.code == result.graph_module.code
    with torch.no_grad():
        assert torch.allclose(again.graph_module(X), result.graph_module(X) + 1.0, atol=1e-5)


def test_saving_twice_is_byte_identical(saved, tmp_path) -> None:
    result, directory = saved
    fxprune.save(result, tmp_path)
    for name in ("plan.json", "model.safetensors", "module.py", "README.md"):
        assert (tmp_path / name).read_bytes() == (directory / name).read_bytes(), name


@pytest.mark.slow
def test_module_loads_without_fxprune_in_a_subprocess(saved, tmp_path) -> None:
    result, directory = saved
    save_file({"x": X}, tmp_path / "x.safetensors")
    script = textwrap.dedent(f"""
        import pickle, sys
        sys.modules["fxprune"] = None                       # import fxprune -> ImportError
        def refuse(*a, **k): raise AssertionError("unpickling")
        class Refusing(pickle.Unpickler):
            load = refuse
        pickle.load, pickle.loads, pickle.Unpickler = refuse, refuse, Refusing
        import torch
        torch.load = refuse
        from safetensors.torch import load_file, save_file
        sys.path.insert(0, {str(directory)!r})
        import module
        model = module.load()
        assert "fxprune" not in sys.modules or sys.modules["fxprune"] is None
        with torch.no_grad():
            y = model(load_file({str(tmp_path / 'x.safetensors')!r})["x"])
        save_file({{"y": y}}, {str(tmp_path / 'y.safetensors')!r})
        print(model.training, sum(p.numel() for p in model.parameters()))  # fxprune keeps the flags
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    with torch.no_grad():
        expected = result.graph_module(X)
    # same weights and graph; another process may pick other CPU kernels (thread count), so not bitwise
    torch.testing.assert_close(load_file(tmp_path / "y.safetensors")["y"], expected, rtol=1e-5, atol=1e-6)
    params = sum(p.numel() for p in result.graph_module.parameters())
    assert done.stdout.split() == [str(result.graph_module.training), str(params)]


# --- the generated module: layers rebuilt from constructor arguments, ties, buffers ------------------
class Tied(nn.Module):
    """Two names for one weight, a non-persistent buffer, an LSTM and attention."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(12, 8)
        self.lstm = nn.LSTM(8, 8, batch_first=True)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True, bias=False)
        self.head = nn.Linear(8, 12, bias=False)
        self.head.weight = self.emb.weight
        self.register_buffer("scale", torch.full((8,), 0.5), persistent=False)

    def forward(self, tokens):
        h, _ = self.lstm(self.emb(tokens))
        h, _ = self.attn(h, h, h)
        return self.head(h * self.scale)


def test_generated_module_keeps_ties_buffers_and_layers(tmp_path) -> None:
    torch.manual_seed(0)
    gm = torch.fx.symbolic_trace(Tied().eval())
    tokens = torch.randint(0, 12, (2, 5))
    fxprune.save(gm, tmp_path)
    assert not (tmp_path / "plan.json").exists()  # a bare GraphModule has no plan
    source = (tmp_path / "module.py").read_text()
    assert "torch.nn.MultiheadAttention(embed_dim=8, num_heads=2, bias=False, batch_first=True)" in source
    assert "torch.nn.LSTM(input_size=8, hidden_size=8, batch_first=True)" in source
    model = _import_module(tmp_path / "module.py", "tied_module").load()
    assert model.head.weight is model.emb.weight
    assert "scale" not in model.state_dict() and torch.equal(model.scale, gm.scale)
    with torch.no_grad():
        assert torch.equal(model(tokens), gm(tokens))


def test_training_flags_and_frozen_parameters_survive(tmp_path) -> None:
    gm = torch.fx.symbolic_trace(nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.BatchNorm1d(4)))
    gm.train()
    gm.get_submodule("2").eval()
    fxprune.save(gm, tmp_path)
    model = _import_module(tmp_path / "module.py", "flags_module").load()
    assert [m.training for m in model.modules()] == [m.training for m in gm.modules()]


def test_a_layer_that_cannot_be_written_as_source_is_refused_before_writing(tmp_path) -> None:
    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(3))

        def forward(self, x):
            return x * self.w

    class Leafy(torch.fx.Tracer):
        def is_leaf_module(self, m, name):
            return isinstance(m, Custom) or super().is_leaf_module(m, name)

    model = nn.Sequential(Custom())
    gm = torch.fx.GraphModule(model, Leafy().trace(model))
    with pytest.raises(UnsupportedModelError, match=r"module '0' \(.*Custom\)"):
        fxprune.save(gm, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --- refused files ---------------------------------------------------------------------------------
def _copy(src: Path, dst: Path) -> None:
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())


def _with_plan(directory: Path, tmp_path: Path, edit) -> Path:
    _copy(directory, tmp_path)
    data = json.loads((directory / "plan.json").read_text())
    text = edit(data)
    (tmp_path / "plan.json").write_text(text if isinstance(text, str) else json.dumps(data))
    return tmp_path


BAD_PLANS = {
    "extra top-level key": lambda d: d.update({"__reduce__": ["os.system", ["echo pwned"]]}),
    "py/reduce payload in a group": lambda d: d["groups"][0].update({"py/reduce": [{"py/function": "os.system"}]}),
    "index as a string": lambda d: d["kept_indices"][next(iter(d["kept_indices"]))].update({"0": ["1", "2"]}),
    "index as a float": lambda d: d["shapes"].update({next(iter(d["shapes"])): [1.5]}),
    "wrong format": lambda d: d.update({"format": "pickle/4"}),
    "kept_indices a list": lambda d: d.update({"kept_indices": []}),
    "not an object": lambda d: "[1, 2, 3]",
    "not JSON": lambda d: "cos\nsystem\n(S'echo pwned'\ntR.",
    "nested too deep": lambda d: "[" * 100_000 + "]" * 100_000,
}


@pytest.mark.parametrize("edit", BAD_PLANS.values(), ids=BAD_PLANS.keys())
def test_a_malicious_plan_is_refused(saved, tmp_path, edit, no_unpickling) -> None:
    _, directory = saved
    with pytest.raises(UnsafeFileError, match="plan"):
        fxprune.load(_with_plan(directory, tmp_path, edit), resnet18(), (X,))


class _Payload:
    def __reduce__(self):
        return (Path.touch, (Path("/tmp/fxprune_pwned"),))


@pytest.mark.parametrize("writer", ["torch.save", "pickle", "garbage"])
def test_a_pickle_renamed_to_safetensors_is_refused(saved, tmp_path, writer) -> None:
    result, directory = saved
    _copy(directory, tmp_path)
    target = tmp_path / "model.safetensors"
    if writer == "torch.save":
        torch.save(result.graph_module.state_dict(), target)
    elif writer == "pickle":
        target.write_bytes(pickle.dumps(_Payload(), protocol=2))
    else:
        target.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")
    Path("/tmp/fxprune_pwned").unlink(missing_ok=True)
    with pytest.raises(UnsafeFileError, match="model.safetensors"):
        fxprune.load(tmp_path, resnet18(), (X,))
    assert not Path("/tmp/fxprune_pwned").exists()


@pytest.mark.parametrize("saved", ["fx"], indirect=True)
def test_tensors_that_do_not_fit_the_plan_are_refused(saved, tmp_path) -> None:
    _, directory = saved
    _copy(directory, tmp_path)
    state = load_file(directory / "model.safetensors")
    state["fc.weight"] = state["fc.weight"][:, :-1].contiguous()
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(PlanMismatchError, match=r"'fc.weight'"):
        fxprune.load(tmp_path, resnet18(), (X,))
    del state["fc.weight"]
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(PlanMismatchError, match=r"missing \['fc.weight'\]"):
        fxprune.load(tmp_path, resnet18(), (X,))


@pytest.mark.parametrize("saved", ["fx"], indirect=True)
def test_a_plan_for_another_model_is_refused(saved) -> None:
    _, directory = saved
    torch.manual_seed(0)
    with pytest.raises(PlanMismatchError):
        fxprune.load(directory, torchvision.models.resnet34().eval(), (X,))


# --- the torch.export route (.pt2) -------------------------------------------------------------------
@pytest.fixture(scope="module")
def pt2_file(tmp_path_factory) -> tuple[fxprune.PruneResult, Path]:
    """The documented route: export the pruned GraphModule, then ``torch.export.save``."""
    result = fxprune.prune(resnet18(), (X,), sparsity=0.5, capture="export")
    path = tmp_path_factory.mktemp("pt2") / "pruned.pt2"
    torch.export.save(torch.export.export(result.graph_module, (X,)), path)
    return result, path


@pytest.mark.slow
def test_pt2_route_round_trip(pt2_file) -> None:
    result, path = pt2_file
    loaded = fio.load_pt2(path)
    with torch.no_grad():
        assert torch.equal(loaded.module()(X), result.graph_module(X))
    again = fxprune.prune(loaded, (X,), sparsity=0.5)  # a loaded .pt2 prunes again, at the export level
    assert again.level == "export"


def _rewrite_entry(src: Path, dst: Path, suffix: str, edit) -> None:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            zout.writestr(info, edit(data) if info.filename.endswith(suffix) else data)


def _use_pickle(data: bytes) -> bytes:
    config = json.loads(data)
    first = next(iter(config["config"].values()))
    first["use_pickle"] = True
    return json.dumps(config).encode()


@pytest.mark.slow
@pytest.mark.parametrize(("suffix", "edit"), [
    ("model_weights_config.json", _use_pickle),
    ("sample_inputs/model.pt", lambda data: pickle.dumps(_Payload(), protocol=2)),
], ids=["pickled weight", "pickled example inputs"])
def test_a_pt2_that_would_unpickle_is_refused(pt2_file, tmp_path, suffix, edit) -> None:
    _rewrite_entry(pt2_file[1], tmp_path / "bad.pt2", suffix, edit)
    Path("/tmp/fxprune_pwned").unlink(missing_ok=True)
    with pytest.raises(UnsafeFileError, match="bad.pt2"):
        fio.load_pt2(tmp_path / "bad.pt2")
    assert not Path("/tmp/fxprune_pwned").exists()


def test_a_file_that_is_not_a_pt2_is_refused(tmp_path) -> None:
    (tmp_path / "model.pt2").write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(UnsafeFileError, match="not a torch.export .pt2 archive"):
        fio.load_pt2(tmp_path / "model.pt2")
