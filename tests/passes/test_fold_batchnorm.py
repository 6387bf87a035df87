"""fold-batchnorm: eval-mode BatchNorm folded into the conv / linear before it, at both levels."""
from __future__ import annotations

import operator

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.passes.infra.pass_manager import PassManager

from fxprune.core.capture import capture
from fxprune.passes import FoldBatchNorm
from fxprune.passes.fold_batchnorm import output_scale
from fxprune.measure import count_params
from fxprune.options import CAPTURES

aten = torch.ops.aten


def _randomize(model: nn.Module) -> nn.Module:
    """Non-trivial statistics, so a wrong fold shows in the numbers."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            if m.affine:
                nn.init.uniform_(m.weight, 0.5, 2)
                nn.init.uniform_(m.bias, -1, 1)
    return model.eval()


class ConvBn(nn.Module):
    def __init__(self, conv: nn.Module, bn: nn.Module) -> None:
        super().__init__()
        self.conv, self.bn = conv, bn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.conv(x)))


class Net(nn.Module):
    """Two folds and a BatchNorm1d after a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, groups=2), nn.BatchNorm2d(8)
        self.fc, self.bn3 = nn.Linear(8, 4), nn.BatchNorm1d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)))
        return self.bn3(self.fc(y.mean((2, 3))))


X = torch.randn(2, 3, 10, 10)
CASES = {  # producer, norm, input
    "conv1d": (nn.Conv1d(3, 6, 3), nn.BatchNorm1d(6), torch.randn(2, 3, 9)),
    "conv2d-no-bias": (nn.Conv2d(3, 6, 3, bias=False), nn.BatchNorm2d(6), X),
    "conv3d": (nn.Conv3d(3, 6, 3), nn.BatchNorm3d(6), torch.randn(2, 3, 5, 5, 5)),
    "grouped": (nn.Conv2d(4, 6, 3, groups=2), nn.BatchNorm2d(6), torch.randn(2, 4, 8, 8)),
    "depthwise": (nn.Conv2d(4, 4, 3, groups=4, padding=1, padding_mode="reflect"), nn.BatchNorm2d(4),
                  torch.randn(2, 4, 8, 8)),
    "transposed": (nn.ConvTranspose2d(3, 6, 3, stride=2), nn.BatchNorm2d(6), X),
    "transposed-grouped": (nn.ConvTranspose1d(4, 6, 3, groups=2, bias=False), nn.BatchNorm1d(6),
                           torch.randn(2, 4, 7)),
    "linear": (nn.Linear(5, 6), nn.BatchNorm1d(6), torch.randn(3, 5)),
    "not-affine": (nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6, affine=False), X),
}


def _norms(gm: fx.GraphModule) -> list:
    targets = (aten.batch_norm.default, aten._native_batch_norm_legit_no_training.default)
    return [n for n in gm.graph.nodes if n.target in targets
            or n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.modules.batchnorm._BatchNorm)]


def _assert_same_outputs(a: torch.nn.Module, b: torch.nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        torch.testing.assert_close(b(x), a(x), rtol=1e-5, atol=1e-5)


def test_fx_level(run_pure, graph_snapshot) -> None:
    model = _randomize(Net())
    gm = capture(model, (X,)).gm
    result = run_pure(FoldBatchNorm(), gm)
    assert result.graph_module == graph_snapshot
    assert result.modified
    assert _norms(gm) and not _norms(result.graph_module)
    assert count_params(result.graph_module) == count_params(gm) - 2 * (8 + 8 + 4) + 8  # conv1 gains a bias
    _assert_same_outputs(model, result.graph_module, X)


def test_export_level(run_pure, graph_snapshot) -> None:
    model = _randomize(Net())
    gm = capture(model, (X,), "export").gm
    result = run_pure(FoldBatchNorm(), gm)
    assert result.graph_module == graph_snapshot
    assert not _norms(result.graph_module)
    assert not [k for k in result.graph_module.state_dict() if k.startswith("bn")]
    _assert_same_outputs(model, result.graph_module, X)


def test_decomposed_export_level(run_pure, graph_snapshot) -> None:
    # run_decompositions spells it convolution + _native_batch_norm_legit_no_training + getitem;
    # a linear decomposes to addmm(bias, x, permute(weight)), which is not matched: bn3 stays
    model = _randomize(Net())
    program = torch.export.export(model, (X,)).run_decompositions()
    gm = capture(program, (X,)).gm
    result = run_pure(FoldBatchNorm(), gm)
    assert result.graph_module == graph_snapshot
    assert len(_norms(gm)) == 3
    (left,) = _norms(result.graph_module)
    assert left.args[0].target == aten.addmm.default
    assert len(result.graph_module.graph.find_nodes(op="call_function", target=operator.getitem)) == 1
    _assert_same_outputs(model, result.graph_module, X)


@pytest.mark.parametrize("case", CASES.keys())
def test_producers(case: str, level: str, run_pure) -> None:
    conv, norm, x = CASES[case]
    model = _randomize(ConvBn(conv, norm))
    gm = capture(model, (x,), level).gm
    result = run_pure(FoldBatchNorm(), gm)
    assert result.modified and not _norms(result.graph_module)
    _assert_same_outputs(model, result.graph_module, x)


def test_weights_are_new_and_keep_their_flags(run_pure) -> None:
    model = _randomize(ConvBn(nn.Conv2d(3, 4, 3).double(), nn.BatchNorm2d(4).double()))
    model.conv.weight.requires_grad_(False)
    x = X.double()
    folded = run_pure(FoldBatchNorm(), capture(model, (x,)).gm).graph_module
    assert folded.conv.weight.dtype == folded.conv.bias.dtype == torch.float64
    assert not folded.conv.weight.requires_grad and folded.conv.bias.requires_grad
    assert isinstance(folded.conv.weight, nn.Parameter)
    _assert_same_outputs(model, folded, x)


def test_output_scale_of_a_grouped_transposed_weight() -> None:
    # weight[in=4, out/g=3]: inputs 0-1 feed outputs 0-2, inputs 2-3 feed outputs 3-5
    scale = torch.arange(6.0)
    grid = output_scale(scale, (4, 3, 1), transposed=True, groups=2).squeeze(-1)
    assert grid.tolist() == [[0, 1, 2], [0, 1, 2], [3, 4, 5], [3, 4, 5]]


class Shared(nn.Module):
    """conv -> bn, and the conv's output also read directly."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.bn(y) + y


class Reused(nn.Module):
    """One conv module called twice, once before a BatchNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x)) + self.conv(x)


class Sequence(nn.Module):
    """A linear over [N, L, F] and BatchNorm1d(L): it normalises L, not the linear's features."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.bn = nn.Linear(5, 5), nn.BatchNorm1d(5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.fc(x))


def _training_bn() -> nn.Module:
    """Only the BatchNorm trains: the graph is otherwise in eval mode."""
    model = _randomize(ConvBn(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    model.bn.train()
    return model


UNFOLDABLE = {  # model factory (built in eval mode), input
    "no-batchnorm": (lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), X),
    "training-mode": (_training_bn, X),
    "no-running-stats": (lambda: ConvBn(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False)), X),
    "output-read-twice": (Shared, X),
    "conv-called-twice": (Reused, torch.randn(2, 4, 6, 6)),
    "bn-over-sequence": (Sequence, torch.randn(2, 5, 5)),
}


# export refuses a training-mode BatchNorm (see the aten.batch_norm(training=True) test instead)
LEFT_ALONE = [(case, level) for case in UNFOLDABLE for level in CAPTURES
              if not (level == "export" and case == "training-mode")]


@pytest.mark.parametrize("case, level", LEFT_ALONE)
def test_left_alone(case: str, level: str, run_pure) -> None:
    make, x = UNFOLDABLE[case]
    model = make() if case == "training-mode" else _randomize(make())
    gm = capture(model, (x,), level).gm
    result = run_pure(FoldBatchNorm(), gm)
    assert not result.modified
    assert len(_norms(result.graph_module)) == len(_norms(gm))
    _assert_same_outputs(model, result.graph_module, x)


def test_training_mode_batchnorm_in_an_eval_graph_at_export_level(run_pure) -> None:
    # aten.batch_norm(..., training=True) normalises with batch statistics: never folded
    gm = capture(_randomize(ConvBn(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))), (X,), "export").gm
    (norm,) = _norms(gm)
    norm.args = norm.args[:5] + (True,) + norm.args[6:]
    gm.recompile()
    assert not run_pure(FoldBatchNorm(), gm).modified


def test_in_a_pass_manager() -> None:
    model = _randomize(Net())
    gm = capture(model, (X,)).gm
    result = PassManager(passes=[FoldBatchNorm()], steps=3)(gm)
    assert result.modified and not _norms(result.graph_module)
    _assert_same_outputs(model, result.graph_module, X)
