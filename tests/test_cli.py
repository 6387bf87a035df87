"""The ``fxprune`` command: the main job (table, model, chart), inspect, one-line errors, the console script."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import fxprune
from fxprune.cli import main

PNG = b"\x89PNG\r\n\x1a\n"

FACTORY = textwrap.dedent('''
    import torch
    from torch import nn

    def small():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                             nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                             nn.Flatten(), nn.Linear(32, 10))

    def not_a_model():
        return 42

    def broken():
        raise RuntimeError("no weights here")
''')


@pytest.fixture
def factory(tmp_path, monkeypatch) -> str:
    """A ``package.module:factory`` SPEC importable from a temporary directory."""
    (tmp_path / "cli_models.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "cli_models:small"


def rows(text: str) -> dict[str, list[str]]:
    """The printed tables' rows, by first cell: ``| conv1 | 64 → 32 |`` -> {"conv1": ["64 → 32"]}."""
    cells = [[c.strip() for c in line.strip().strip("|").split("|")] for line in text.splitlines()
             if line.startswith("|") and not line.startswith("|-")]
    return {c[0]: c[1:] for c in cells}


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_prune_writes_table_model_and_chart(capsys, tmp_path, factory) -> None:
    out = tmp_path / "pruned"
    code, stdout, stderr = run(capsys, "prune", factory, "--sparsity", "0.5", "--input-shape", "2,3,8,8",
                               "--out", str(out))
    assert code == 0, stderr
    table = rows(stdout)
    assert table["0"] == ["16 → 8", ""] and table["3"] == ["32 → 16", ""]  # the convs' groups
    assert table["7"][0] == "10 → 10" and table["7"][1].startswith("frozen: reaches a graph output")
    assert table["params"] == ["5,450", "1,578", "29.0%"] and table["MACs"][0] == "645,760"
    assert "verify passed" in stdout
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "model.safetensors", "module.py", "plan.json",
                                                     "summary.md", "widths.png"]
    assert (out / "summary.md").read_text() in stdout
    assert (out / "widths.png").read_bytes().startswith(PNG)
    plan = json.loads((out / "plan.json").read_text())
    assert plan["options"]["sparsity"] == 0.5 and plan["options"]["criterion"] == "group_magnitude"
    import cli_models
    again = fxprune.load(out, cli_models.small().eval(), (torch.randn(2, 3, 8, 8),))
    assert again.graph_module.get_submodule("0").out_channels == 8


def test_prune_output_module_writes_the_state_dict_of_the_class(capsys, tmp_path, factory) -> None:
    import fxprune.module
    out = tmp_path / "pruned"
    code, stdout, stderr = run(capsys, "prune", factory, "--sparsity", "0.5", "--input-shape", "2,3,8,8",
                               "--output", "module", "--out", str(out))
    assert code == 0, stderr
    assert "same class back (Sequential)" in stdout and "params: 5,450 -> 1,578" in stdout
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors", "plan.json", "sizes.json", "summary.md"]
    import cli_models
    small = fxprune.module.load(out, cli_models.small().eval())
    assert type(small) is torch.nn.Sequential and small[0].out_channels == 8 and small[7].in_features == 16
    code, _, stderr = run(capsys, "prune", factory, "--input-shape", "2,3,8,8", "--output", "module",
                          "--to", "onnx", "--out", str(tmp_path / "x"))
    assert code != 0 and "--to" in stderr


def test_prune_options_reach_the_plan(capsys, tmp_path, factory) -> None:
    out = tmp_path / "pruned"
    code, _, stderr = run(capsys, "prune", factory, "--input-shape", "1,3,8,8", "--out", str(out),
                          "--sparsity", "0.3", "--criterion", "fpgm", "--capture", "export", "--round-to", "4",
                          "--global-ranking", "--ignore", "3", "--seed", "1", "--no-chart")
    assert code == 0, stderr
    options = json.loads((out / "plan.json").read_text())["options"]
    assert options | {"sparsity": 0.3, "criterion": "fpgm", "capture": "export", "round_to": 4,
                      "global_ranking": True, "ignore": ["3"]} == options
    assert not (out / "widths.png").exists()
    assert load_file(out / "model.safetensors")["3.weight"].shape[0] == 32  # ignored: kept whole


@pytest.mark.slow
def test_main_job_on_resnet18(capsys, tmp_path) -> None:
    out = tmp_path / "pruned"
    code, stdout, stderr = run(capsys, "prune", "torchvision:resnet18", "--sparsity", "0.5", "--input-shape",
                               "1,3,64,64", "--out", str(out))
    assert code == 0, stderr
    table = rows(stdout)
    assert table["conv1"][0] == "64 → 32" and table["layer4.0.conv2"][0] == "512 → 256"
    assert table["params"] == ["11,689,512", "3,055,880", "26.1%"]
    assert "verify passed" in stdout
    assert (out / "widths.png").stat().st_size > 10_000
    assert load_file(out / "model.safetensors")["conv1.weight"].shape == (32, 3, 7, 7)


def test_inspect_prints_groups_and_why_frozen(capsys, factory, tmp_path) -> None:
    code, stdout, stderr = run(capsys, "inspect", factory, "--input-shape", "1,3,8,8")
    assert code == 0, stderr
    lines = stdout.splitlines()
    assert lines[0] == "cli_models:small (fx level): 3 groups, 2 prunable"
    assert rows(stdout) == {"group": ["units", "members", "state"], "0": ["16", "7", "exact"],
                            "3": ["32", "3", "exact"], "7": ["10", "2", "frozen"]}
    assert lines[-1].startswith("7: 10 of 10 units frozen: reaches a graph output")
    assert not list(tmp_path.glob("*/plan.json"))  # inspect writes nothing


def test_inspect_resnet18(capsys) -> None:
    code, stdout, _ = run(capsys, "inspect", "torchvision:resnet18", "--input-shape", "1,3,32,32")
    assert code == 0
    assert stdout.startswith("torchvision:resnet18 (fx level): 13 groups, 12 prunable\n")
    assert rows(stdout)["layer1.0.conv1"] == ["64", "6", "exact"]


def test_a_pt2_spec_prunes_with_its_own_example_inputs(capsys, tmp_path, factory) -> None:
    import cli_models
    torch.export.save(torch.export.export(cli_models.small().eval(), (torch.randn(1, 3, 8, 8),)),
                      tmp_path / "small.pt2")
    code, stdout, stderr = run(capsys, "prune", str(tmp_path / "small.pt2"), "--out", str(tmp_path / "out"),
                               "--no-chart")
    assert code == 0, stderr
    assert "export level" in stdout and rows(stdout)["0"][0] == "16 → 8"


def _bad_pt2(tmp_path: Path) -> str:
    good = tmp_path / "good.pt2"
    torch.export.save(torch.export.export(torch.nn.Linear(2, 2), (torch.randn(1, 2),)), good)
    with zipfile.ZipFile(good) as zin, zipfile.ZipFile(tmp_path / "bad.pt2", "w") as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            if info.filename.endswith("weights_config.json"):
                config = json.loads(data)
                for payload in config["config"].values():
                    payload["use_pickle"] = True
                data = json.dumps(config).encode()
            zout.writestr(info, data)
    return str(tmp_path / "bad.pt2")


ERRORS = {
    "unknown torchvision model": (["prune", "torchvision:nope", "--input-shape", "1,3,8,8"],
                                  r"torchvision has no model 'nope'"),
    "bad SPEC": (["prune", "resnet18", "--input-shape", "1,3,8,8"], r"bad SPEC 'resnet18'"),
    "module not importable": (["prune", "no_such_pkg.models:make", "--input-shape", "1,3"],
                              r"cannot import 'no_such_pkg.models'"),
    "factory missing": (["prune", "cli_models:nothing", "--input-shape", "1,3"], r"has no attribute 'nothing'"),
    "factory returns no model": (["prune", "cli_models:not_a_model", "--input-shape", "1,3"],
                                 r"returned int, not an nn.Module"),
    "factory raises": (["prune", "cli_models:broken", "--input-shape", "1,3"],
                       r"cli_models:broken\(\) raised RuntimeError: no weights here"),
    "bad shape": (["prune", "cli_models:small", "--input-shape", "1,x,8"], r"bad shape '1,x,8'"),
    "negative shape": (["inspect", "cli_models:small", "--input-shape", "1,-3"], r"bad shape '1,-3'"),
    "shape the model rejects": (["prune", "cli_models:small", "--input-shape", "1,5,8,8"],
                                r"rejects example inputs of shapes \[\(1, 5, 8, 8\)\]"),
    "missing shape": (["prune", "cli_models:small"], r"--input-shape is required"),
    "bad sparsity": (["prune", "cli_models:small", "--input-shape", "1,3,8,8", "--sparsity", "1.5"],
                     r"bad sparsity '1.5'"),
    "pattern matching nothing": (["prune", "cli_models:small", "--input-shape", "1,3,8,8", "--ignore", "zz*"],
                                 r"pattern 'zz\*' matches no prunable module"),
    "unknown criterion": (["prune", "cli_models:small", "--input-shape", "1,3,8,8", "--criterion", "l3"],
                          r"invalid choice: 'l3'"),
    "missing .pt2": (["inspect", "nowhere.pt2"], r"no file 'nowhere.pt2'"),
    "unknown command": (["shrink", "x"], r"invalid choice: 'shrink'"),
}


@pytest.mark.parametrize(("argv", "pattern"), ERRORS.values(), ids=ERRORS.keys())
def test_errors_print_one_line_and_exit_2(capsys, tmp_path, factory, argv, pattern) -> None:
    out = tmp_path / "out"
    argv = argv + (["--out", str(out)] if argv[0] == "prune" else [])
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own errors exit from parse_args
        code = exc.code
    stdout, stderr = capsys.readouterr()
    assert code == 2
    assert stderr.count("\n") == 1 and stderr.startswith("fxprune: error: "), stderr
    assert __import__("re").search(pattern, stderr), stderr
    assert stdout == "" and not out.exists()


def test_an_unsafe_pt2_is_refused_in_one_line(capsys, tmp_path) -> None:
    code, stdout, stderr = run(capsys, "inspect", _bad_pt2(tmp_path))
    assert code == 2 and stderr.count("\n") == 1
    assert stderr.startswith("fxprune: error: ") and "pickled object; refusing" in stderr


@pytest.mark.parametrize("flag", ["--help", "--version"])
def test_help_and_version(capsys, flag) -> None:
    with pytest.raises(SystemExit) as exc:
        main([flag])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert ("fxprune 0.1.0" if flag == "--version" else "prune     prune a model") in out


def test_subcommand_help_lists_the_options(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["prune", "--help"])
    out = capsys.readouterr().out
    for option in ("--sparsity", "--criterion", "--input-shape", "--out", "--capture", "--ignore", "--round-to",
                   "--global-ranking", "--seed"):
        assert option in out


def _console_script() -> str:
    beside = Path(sys.executable).with_name("fxprune")
    found = str(beside) if beside.exists() else shutil.which("fxprune")
    if found is None:
        pytest.fail("the fxprune console script is not installed: run pip install -e .")
    return found


@pytest.mark.slow
def test_the_installed_console_script_runs_the_main_job(tmp_path) -> None:
    env = {**os.environ, "PYTHONPATH": ""}
    done = subprocess.run([_console_script(), "prune", "torchvision:resnet18", "--sparsity", "0.5",
                           "--input-shape", "1,3,64,64", "--out", str(tmp_path / "pruned")],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    assert "verify passed" in done.stdout
    assert {"plan.json", "model.safetensors", "module.py", "summary.md", "widths.png"} <= \
        {p.name for p in (tmp_path / "pruned").iterdir()}
    bad = subprocess.run([_console_script(), "prune", "torchvision:nope", "--input-shape", "1,3,8,8", "--out",
                          str(tmp_path / "x")], capture_output=True, text=True, timeout=120, env=env)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1
