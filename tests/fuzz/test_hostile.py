"""Issue 17's holes, each closed with a test: the table of hostile inputs (``hostile.CASES``, rows of the
README's bad-input table), the ``.pt2`` checks (strings torch evaluates, duplicated entries), safetensors
detected by structure, all-or-nothing outputs, and the warning for non-finite weights."""
from __future__ import annotations

import re
import struct
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import fxprune
from fxprune import errors
from fxprune import io as fio
from fxprune.errors import UnsafeFileError
from hostile import (CASES, CLI_CASES, PICKLED_CONFIG, X, duplicated_pt2, dynamic_pt2, inject, rewrite_pt2,
                     saved_result, small_model)


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    path = tmp_path / "PWNED"
    yield path
    assert not path.exists(), "a payload ran"


@pytest.mark.parametrize("case, call, error, pattern", CASES, ids=[c[0] for c in CASES])
def test_hostile_input_gets_a_typed_error(tmp_path, case, call, error, pattern) -> None:
    with pytest.raises(error) as info:
        call(tmp_path)
    assert isinstance(info.value, errors.FxPruneError)
    assert re.search(pattern, str(info.value), re.S), str(info.value)
    assert not (tmp_path / "PWNED").exists(), "a payload ran"
    leftovers = [p.name for p in tmp_path.iterdir() if "fxprune-tmp" in p.name or "fxprune-old" in p.name]
    assert not leftovers, f"temporary files left: {leftovers}"


@pytest.mark.parametrize("case, argv, pattern", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_hostile_command_line_is_one_line_and_writes_nothing(tmp_path, capsys, case, argv, pattern) -> None:
    from fxprune.cli import main
    args = argv(tmp_path)
    try:
        status = main([*args, "--no-progress"] if args[0] == "prune" else args)
    except SystemExit as exit_:  # argparse's own errors
        status = exit_.code
    err = capsys.readouterr().err.strip()
    assert status == 2 and re.search(pattern, err) and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_readme_lists_every_hostile_input() -> None:
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    missing = [case for case, *_ in CASES + CLI_CASES if f"| {case} |" not in readme]
    assert not missing, f"README's bad-input table lacks {missing}"


# --- .pt2: strings torch evaluates, duplicated entries ------------------------------------------------
def test_pt2_with_a_sympy_payload_is_refused_naming_the_entry(tmp_path: Path, marker: Path) -> None:
    bad = rewrite_pt2(dynamic_pt2(tmp_path), tmp_path / "bad.pt2", {"models/model.json": inject(marker)})
    with pytest.raises(UnsafeFileError, match=r"models/model\.json.*expr_str"):
        fio.load_pt2(bad)
    assert not marker.exists()


def test_the_sympy_payload_is_real(tmp_path: Path, marker: Path) -> None:
    """The control: ``torch.export.load`` on the edited archive runs the payload."""
    bad = rewrite_pt2(dynamic_pt2(tmp_path), tmp_path / "bad.pt2", {"models/model.json": inject(marker)})
    try:
        torch.export.load(str(bad))
    except Exception:  # the payload returns None, which sympy then fails to multiply
        pass
    assert marker.exists()
    marker.unlink()


def test_a_clean_dynamic_pt2_loads_and_keeps_its_dynamic_batch(tmp_path: Path) -> None:
    program = fio.load_pt2(dynamic_pt2(tmp_path))
    assert program.module()(torch.randn(5, 4)).shape == (5, 3)


def test_pt2_with_a_duplicated_entry_is_refused(tmp_path: Path, marker: Path) -> None:
    """First copy: a weights config that points at a pickle; last copy (what ``zipfile`` returns):
    the unchanged config. The archive is refused whichever copy a reader would take."""
    src = dynamic_pt2(tmp_path)
    bad = rewrite_pt2(src, tmp_path / "dup.pt2", {},
                      before={"data/weights/model_weights_config.json": PICKLED_CONFIG})
    with pytest.raises(UnsafeFileError, match=r"model_weights_config\.json.*twice"):
        fio.load_pt2(bad)


def test_pt2_entries_outside_the_root_folder_are_refused(tmp_path: Path) -> None:
    import zipfile
    src = dynamic_pt2(tmp_path)
    bad = tmp_path / "roots.pt2"
    bad.write_bytes(src.read_bytes())
    with zipfile.ZipFile(bad, "a") as archive:
        archive.writestr("other/data/weights/model_weights_config.json", b"{}")
    with pytest.raises(UnsafeFileError, match="one root folder"):
        fio.load_pt2(bad)


@pytest.mark.parametrize("expr", [
    "Symbol('s0', positive=True, integer=True)",
    "Mul(Integer(2), Symbol('s0', positive=True, integer=True))",
    "FloorDiv(Symbol('s1', integer=True), Integer(4))",
    "Float('1.5', precision=53)",
    "s0*2 + 1",
])
def test_sym_expressions_torch_writes_are_accepted(expr: str) -> None:
    from fxprune.safe_files import check_sym_expr
    check_sym_expr(expr, "model.json")


@pytest.mark.parametrize("expr", [
    "__import__('os').system('x')",
    "Symbol('s0').__class__",
    "Symbol('os.system')",
    "Integer(2)**Integer(10**18)",
    "Pow(Integer(2), Integer(99999999))",
    "Integer(" + "9" * 30 + ")",
    "lambda: 0",
    "[Symbol('s0')]",
    "Symbol('s0', evaluate=eval)",
    "(" * 10_000 + "1" + ")" * 10_000,
    "1" * 5000,
])
def test_sym_expressions_beyond_the_schema_are_refused(expr: str) -> None:
    from fxprune.safe_files import check_sym_expr
    with pytest.raises(UnsafeFileError, match="model.json"):
        check_sym_expr(expr, "model.json")


# --- safetensors by structure ----------------------------------------------------------------------------
@pytest.mark.parametrize("names", [1, 2, 7, 30])
def test_saves_whose_header_length_starts_with_0x80_load(tmp_path: Path, names: int) -> None:
    """A header of 0x280 bytes starts the file with byte 0x80, a pickle's first byte; such saves load.
    safetensors pads its header to 8 bytes: a metadata string of the right length lands on 128 mod 256."""
    from safetensors.torch import save_file
    path = tmp_path / "t.safetensors"
    state = {f"layer{i}.weight": torch.zeros(2) for i in range(names)}
    for pad in range(264):
        save_file(state, str(path), metadata={"pad": "x" * pad})
        if _header(path) % 256 == 128:
            break
    assert path.read_bytes()[0] == 0x80
    loaded, _ = fio.read_safetensors(path)
    assert sorted(loaded) == sorted(state)


def _header(path: Path) -> int:
    return struct.unpack("<Q", path.read_bytes()[:8])[0]


def test_a_real_pickle_is_still_named(tmp_path: Path) -> None:
    import pickle
    path = tmp_path / "t.safetensors"
    path.write_bytes(pickle.dumps({"a": 1}, protocol=4))
    with pytest.raises(UnsafeFileError, match="pickle"):
        fio.read_safetensors(path)


# --- outputs: all or nothing -------------------------------------------------------------------------
def _result():
    return fxprune.prune(small_model(), (X,), 0.5)


def test_save_never_follows_a_planted_link(tmp_path: Path) -> None:
    out = saved_result(tmp_path)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    for name in ("module.py.tmp", "model.safetensors.tmp"):  # where the old save wrote first
        (out / name).symlink_to(victim)
    with pytest.raises(UnsafeFileError, match="did not write"):
        fxprune.save(_result(), out)
    assert victim.read_text() == "precious"


def test_a_failed_save_leaves_the_previous_output_intact(tmp_path: Path, monkeypatch) -> None:
    out = saved_result(tmp_path)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr("fxprune.io.write_new", _fail_after(1, fail))
    result = fxprune.prune(small_model(), (X,), 0.25)
    with pytest.raises(UnsafeFileError, match="No space left"):
        fxprune.save(result, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["saved"]  # no temporary directory left


def _fail_after(n: int, fail):
    from fxprune.safe_files import write_new
    calls = []

    def write(path, data):
        calls.append(path)
        if len(calls) > n:
            fail()
        write_new(path, data)
    return write


def test_a_rerun_replaces_the_whole_output(tmp_path: Path) -> None:
    """A file of an earlier run (a stale model.onnx, a plan of another model) does not survive a rerun."""
    out = saved_result(tmp_path)
    (out / "model.onnx").write_bytes(b"stale")
    fxprune.save(_result().graph_module, out)  # a bare GraphModule: no plan
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "model.safetensors", "module.py"]


def test_cli_failure_leaves_the_previous_output(tmp_path: Path, monkeypatch) -> None:
    from fxprune.cli import main
    out = tmp_path / "out"
    argv = ["prune", "torchvision:resnet18", "--input-shape", "1,3,32,32", "--out", str(out), "--no-progress",
            "--no-chart"]
    assert main(argv) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    monkeypatch.setattr("fxprune.cli.layer_widths", lambda result: 1 / 0)  # the chart step fails
    with pytest.raises(ZeroDivisionError):
        main([*argv[:-1], "--sparsity", "0.25"])
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# --- non-finite weights ------------------------------------------------------------------------------
def test_nan_weights_are_warned_about() -> None:
    model = small_model()
    with torch.no_grad():
        model[0].weight[0, 0, 0, 0] = float("nan")
    with pytest.warns(UserWarning, match=r"NaN or infinite values \(0\.weight\)"):
        result = fxprune.prune(model, (X,), 0.5)
    report = fxprune.verify(model, result, (X,))  # and the report says so
    assert report.non_finite == ("0.weight",) and "hold NaN or infinite values (0.weight)" in str(report)
