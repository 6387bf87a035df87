"""fxprune.testing: the normalized report and the `graph_snapshot` fixture."""

from __future__ import annotations

import textwrap

import pytest
import torch
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from fxprune.testing import FxTextExtension, normalized_code, normalized_report

pytest_plugins = ["pytester"]


class TinyNet(nn.Module):
    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.fc = nn.Linear(width, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        return self.fc(x.mean((2, 3)))


class TupleNet(nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return x.split(2, dim=1)


def _example() -> torch.Tensor:
    return torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def _traced(width: int = 8) -> torch.fx.GraphModule:
    torch.manual_seed(0)
    return torch.fx.symbolic_trace(TinyNet(width).eval())


# ---------------------------------------------------------------- report


def test_report_is_stable_across_traces() -> None:
    assert normalized_report(_traced()) == normalized_report(_traced())


def test_report_strips_comments_and_dead_value_tails() -> None:
    gm = _traced()
    assert "= None" in gm.code  # what fx generates ...
    report = normalized_report(gm)
    assert "= None" not in report and "#" not in report  # ... and what the report keeps
    assert "    conv1 = self.conv1(x)\n" in report
    assert all(line == line.rstrip() for line in report.splitlines())


def test_normalized_code_on_handwritten_code() -> None:
    code = textwrap.dedent(
        """


        def forward(self, x):
            # a comment line
            a = x.add(1);  x = None   \n\n\n
            b = a.fill_("#not a comment") # trailing comment
            c = b.foo(0x7f3a5c2e1b40);  a = b = None
            return c
            """
    )
    assert normalized_code(code) == textwrap.dedent(
        """\
        def forward(self, x):
            a = x.add(1)

            b = a.fill_("#not a comment")
            c = b.foo(0x?)
            return c"""
    )


def test_report_lists_modules_parameters_and_buffers() -> None:
    report = normalized_report(_traced())
    assert "  conv1: Conv2d(3, 8, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1))\n" in report
    assert "  fc: Linear(in_features=8, out_features=4, bias=True)\n" in report
    assert "  conv1.weight: float32 [8, 3, 3, 3]\n" in report
    assert "  fc.weight: float32 [4, 8]\n" in report
    assert "  bn1.num_batches_tracked: int64 []\n" in report
    names = [line.split(":")[0] for line in _section(report, "parameters")]
    assert names == sorted(names)


def test_report_shows_a_module_level_prune_that_code_hides() -> None:
    gm, pruned = _traced(), _traced()
    pruned.conv1 = nn.Conv2d(3, 6, 3, padding=1)
    assert pruned.code == gm.code
    assert normalized_report(pruned) != normalized_report(gm)
    assert "conv1.weight: float32 [6, 3, 3, 3]" in _section(normalized_report(pruned), "parameters")


def test_node_shapes_from_shape_prop() -> None:
    gm = _traced()
    ShapeProp(gm).propagate(_example())
    assert "node shapes:" not in normalized_report(gm)
    assert _section(normalized_report(gm, node_shapes=True), "node shapes") == [
        "x: float32 [2, 3, 8, 8]",
        "conv1: float32 [2, 8, 8, 8]",
        "bn1: float32 [2, 8, 8, 8]",
        "relu: float32 [2, 8, 8, 8]",
        "mean: float32 [2, 8]",
        "fc: float32 [2, 4]",
    ]


def test_node_shapes_of_tuples_and_missing_metadata() -> None:
    gm = torch.fx.symbolic_trace(TupleNet())
    assert _section(normalized_report(gm, node_shapes=True), "node shapes") == ["x: ?", "split: ?"]
    ShapeProp(gm).propagate(torch.randn(1, 4))
    shapes = _section(normalized_report(gm, node_shapes=True), "node shapes")
    assert shapes == ["x: float32 [1, 4]", "split: (float32 [1, 2], float32 [1, 2])"]


def test_export_level_report_has_no_pytree_plumbing() -> None:
    torch.manual_seed(0)
    gm = torch.export.export(TinyNet().eval(), (_example(),)).module()
    report = normalized_report(gm, node_shapes=True)
    for noise in ("pytree", "_in_spec", "_out_spec", "_guards_fn", "= None"):
        assert noise not in report
    assert "    return (linear,)\n" in report
    assert "torch.ops.aten.conv2d.default(x, conv1_weight, conv1_bias" in report
    assert "  conv2d: float32 [2, 8, 8, 8]" in report
    assert _section(report, "modules") == ["(none)"]  # export's parameter holders are not leaves
    assert _section(report, "parameters") == _section(normalized_report(_traced()), "parameters")


# ---------------------------------------------------------------- snapshots


def test_graph_snapshot(graph_snapshot) -> None:
    gm = _traced()
    assert gm == graph_snapshot
    ShapeProp(gm).propagate(_example())
    assert normalized_report(gm, node_shapes=True) == graph_snapshot(name="node_shapes")


def test_extension_writes_fx_txt_text_files() -> None:
    assert FxTextExtension.file_extension == "fx.txt"
    assert FxTextExtension().serialize(_traced()) == normalized_report(_traced())
    with pytest.raises(TypeError, match="GraphModule"):
        FxTextExtension().serialize(TinyNet())


_INNER_TEST = """
import torch
from torch import nn

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, WIDTH)

    def forward(self, x):
        return self.fc(x)

def test_net(graph_snapshot):
    assert torch.fx.symbolic_trace(Net()) == graph_snapshot
"""


def test_changed_model_fails_with_a_readable_diff(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_inner=_INNER_TEST.replace("WIDTH", "3"))
    pytester.runpytest_inprocess("--snapshot-update").assert_outcomes(passed=1)
    written = pytester.path / "__snapshots__" / "test_inner" / "test_net.fx.txt"
    assert "  fc.weight: float32 [3, 4]\n" in written.read_text()

    pytester.runpytest_inprocess().assert_outcomes(passed=1)
    pytester.makepyfile(test_inner=_INNER_TEST.replace("WIDTH", "2"))
    result = pytester.runpytest_inprocess("--color=no", "-vv")
    result.assert_outcomes(failed=1)
    diff = ["*-   fc.weight: float32 [[]3, 4]*", "*+   fc.weight: float32 [[]2, 4]*"]
    result.stdout.fnmatch_lines(diff)


def test_fixture_without_syrupy_names_what_to_install(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_inner="def test_net(graph_snapshot):\n    pass\n")
    result = pytester.runpytest_inprocess("-p", "no:syrupy")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*graph_snapshot fixture needs the syrupy pytest plugin*"])


def _section(report: str, title: str) -> list[str]:
    """The entries of one report section, without their indent."""
    body = report.split(f"\n{title}:\n", 1)[1].split("\n\n", 1)[0]
    return [line.strip() for line in body.splitlines()]
