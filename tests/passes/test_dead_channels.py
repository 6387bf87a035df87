"""dead-channels: channels no output reads are dropped; outputs are unchanged; read channels stay."""
from __future__ import annotations

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.passes.infra.pass_manager import PassManager

from fxprune.core.capture import capture
from fxprune.passes import DeadChannels

X = torch.randn(2, 3, 8, 8)


class SlicedConv(nn.Module):
    """conv(16) -> bn -> relu, read only through ``[:, :8]``: channels 8.. are dead."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.head = nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.bn(self.conv(x)))[:, :8])


class CatPart(nn.Module):
    """Only the second half of a cat is read: ``a`` keeps one channel (a dim is never emptied)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.head = nn.Conv2d(3, 8, 3), nn.Conv2d(3, 6, 3), nn.Conv2d(6, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([self.a(x), self.b(x)], 1)[:, 8:])


class SplitUnused(nn.Module):
    """The second piece of a split is never taken: it keeps one channel (a dim is never emptied)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.head = nn.Conv2d(3, 16, 3), nn.Conv2d(6, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kept, _ = self.conv(x).split([6, 10], 1)
        return self.head(kept)


class Residual(nn.Module):
    """a(x) + b(x) ties the two convs' channels: dead ones go from both."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.fc = nn.Conv2d(3, 12, 3), nn.Conv2d(3, 12, 3), nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc((self.a(x) + self.b(x)).mean((2, 3))[:, 2:7])


class Features(nn.Module):
    """Linear features sliced at the end of the last dim."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 10), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x))[..., -4:])


DEAD = {  # model, input, {parameter: expected shape}
    "sliced-conv": (SlicedConv, X, {"conv.weight": (8, 3, 3, 3), "bn.running_mean": (8,)}),
    "cat-part": (CatPart, X, {"a.weight": (1, 3, 3, 3), "b.weight": (6, 3, 3, 3)}),
    "split-unused": (SplitUnused, X, {"conv.weight": (7, 3, 3, 3)}),
    "residual": (Residual, X, {"a.weight": (5, 3, 3, 3), "b.bias": (5,)}),
    "features": (Features, torch.randn(2, 5, 6), {"fc1.weight": (4, 6), "fc2.weight": (3, 4)}),
}


def _shapes(gm: fx.GraphModule) -> dict:
    return {k: tuple(v.shape) for k, v in gm.state_dict().items()}


def _assert_same_outputs(a: torch.nn.Module, b: torch.nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        torch.testing.assert_close(b(x), a(x))


@pytest.mark.parametrize("case", DEAD.keys())
def test_dead_channels_go(case: str, level: str, run_pure, graph_snapshot) -> None:
    make, x, expected = DEAD[case]
    model = make().eval()
    gm = capture(model, (x,), level).gm
    result = run_pure(DeadChannels(), gm)
    assert result.graph_module == graph_snapshot
    assert result.modified
    shapes = _shapes(result.graph_module)
    assert {k: shapes[k] for k in expected} == expected
    _assert_same_outputs(model, result.graph_module, x)
    assert not DeadChannels()(result.graph_module).modified  # nothing dead is left


class Chain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 8, 3), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


class CountRead(nn.Module):
    """``y.size(1)`` reads how many channels y has: they all stay (export bakes the count in)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.head = nn.Conv2d(3, 16, 3), nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.head(y[:, :4]) * y.size(1)


class Mixed(nn.Module):
    """LayerNorm statistics mix every channel into the kept ones: none is dead."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.norm, self.head = nn.Conv2d(3, 16, 3), nn.LayerNorm(16), nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(self.conv(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.head(y[:, :4])


class Softmaxed(nn.Module):
    """A softmax over channels reads them all (frozen)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.head = nn.Conv2d(3, 16, 3), nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x).softmax(1)[:, :4])


class Summed(nn.Module):
    """A sum over channels contracts them (an activation sink)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return y[:, :4] + y.sum(1, keepdim=True)


LIVE = {"chain": Chain, "layernorm": Mixed, "softmax": Softmaxed, "sum": Summed}


@pytest.mark.parametrize("case", LIVE.keys())
def test_read_channels_stay(case: str, level: str, run_pure) -> None:
    model = LIVE[case]().eval()
    gm = capture(model, (X,), level).gm
    result = run_pure(DeadChannels(), gm)
    assert not result.modified
    assert _shapes(result.graph_module) == _shapes(gm)
    _assert_same_outputs(model, result.graph_module, X)


def test_a_channel_count_read_at_run_time_keeps_its_channels(run_pure) -> None:
    model = CountRead().eval()
    fx_result = run_pure(DeadChannels(), capture(model, (X,)).gm)
    assert not fx_result.modified
    exported = run_pure(DeadChannels(), capture(model, (X,), "export").gm)  # size(1) became 16
    assert exported.modified and exported.graph_module.conv.weight.shape[0] == 4
    _assert_same_outputs(model, exported.graph_module, X)


class Unused(nn.Module):
    """A branch whose output nobody reads (kept by symbolic_trace): its channels are all dead."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.unused = nn.Conv2d(3, 4, 3), nn.Conv2d(3, 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.unused(x)
        return self.conv(x)


def test_an_unused_layer_keeps_one_channel(run_pure) -> None:
    model = Unused().eval()
    result = run_pure(DeadChannels(), capture(model, (X,)).gm)
    assert result.graph_module.unused.out_channels == 1  # removing the layer is dead-code elimination
    assert result.graph_module.conv.out_channels == 4
    _assert_same_outputs(model, result.graph_module, X)


def test_in_a_pass_manager() -> None:
    model = SlicedConv().eval()
    result = PassManager(passes=[DeadChannels()], steps=2)(capture(model, (X,)).gm)
    assert result.modified and result.graph_module.conv.out_channels == 8
    _assert_same_outputs(model, result.graph_module, X)
