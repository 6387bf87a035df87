"""Conv rules: plain, grouped (whole groups), depthwise, transposed, 1d/3d, functional with a loose weight."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxprune



def build(factory):
    torch.manual_seed(0)
    return factory().eval()


class ConvChain(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.c2 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.c3 = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        return self.c3(F.relu(self.c2(F.relu(self.c1(x)))))


class Grouped(nn.Module):
    """ResNeXt-style: 1x1 -> grouped 3x3 (4 groups) -> 1x1."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 16, 1)
        self.g = nn.Conv2d(16, 32, 3, padding=1, groups=4)
        self.b = nn.Conv2d(32, 4, 1)

    def forward(self, x):
        return self.b(torch.relu(self.g(torch.relu(self.a(x)))))


class Depthwise(nn.Module):
    """Inverted residual: expand -> depthwise -> project, with a residual."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.expand = nn.Conv2d(8, 24, 1)
        self.dw = nn.Conv2d(24, 24, 3, padding=1, groups=24)
        self.project = nn.Conv2d(24, 8, 1)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        x = self.stem(x)
        y = self.project(F.relu6(self.dw(F.relu6(self.expand(x)))))
        return self.head(x + y)


class Transposed(nn.Module):
    """UNet-like: down, up with a transposed conv, skip concatenation."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Conv2d(3, 8, 3, padding=1)
        self.down = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.up = nn.ConvTranspose2d(16, 8, 2, stride=2)
        self.dec = nn.Conv2d(16, 2, 3, padding=1)

    def forward(self, x):
        skip = torch.relu(self.enc(x))
        up = self.up(torch.relu(self.down(skip)))
        return self.dec(torch.cat([skip, up], dim=1))


class Conv1dPReLU(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(4, 12, 3, padding=1)
        self.act = nn.PReLU(12)
        self.c2 = nn.Conv1d(12, 3, 1)

    def forward(self, x):
        return self.c2(self.act(self.c1(x)))


class Conv3d(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv3d(2, 8, 3, padding=1)
        self.bn = nn.BatchNorm3d(8)
        self.c2 = nn.ConvTranspose3d(8, 6, 1)
        self.c3 = nn.Conv3d(6, 2, 1)

    def forward(self, x):
        return self.c3(self.c2(F.relu(self.bn(self.c1(x)))))


class LooseWeight(nn.Module):
    """F.conv2d with parameters held directly by the model."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(12, 3, 3, 3))
        self.bias = nn.Parameter(torch.randn(12))
        self.out = nn.Conv2d(12, 2, 1)

    def forward(self, x):
        return self.out(torch.tanh(F.conv2d(x, self.weight, self.bias, padding=1)))


CASES = {
    "chain": (ConvChain, (1, 3, 8, 8)),
    "grouped": (Grouped, (1, 3, 8, 8)),
    "depthwise": (Depthwise, (1, 3, 8, 8)),
    # unbatched (C, H, W): the channel is dim 0; groups shrink with it (a literal at the export level)
    "grouped_unbatched": (Grouped, (3, 8, 8)),
    "depthwise_unbatched": (Depthwise, (3, 8, 8)),
    "transposed": (Transposed, (1, 3, 8, 8)),
    "conv1d_prelu": (Conv1dPReLU, (2, 4, 10)),
    "conv3d": (Conv3d, (1, 2, 4, 4, 4)),
    "loose_weight": (LooseWeight, (1, 3, 8, 8)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_conv_prunes_and_verifies(prune_checked, case, level):
    factory, shape = CASES[case]
    torch.manual_seed(1)
    prune_checked(build(factory), torch.randn(shape), level, sparsity=0.5)


def test_grouped_conv_prunes_whole_groups(level):
    model = build(Grouped)
    result = fxprune.prune(model, torch.randn(1, 3, 8, 8), 0.5, capture=level)
    group = next(g for g in result.groups if g.name == "a")
    assert group.size == 4  # one unit per conv group: a's 16 outputs and g's 32, 4 groups of (4 + 8)
    kept = result.plan.kept_indices
    assert len(kept["g.weight"][0]) == 16 and len(kept["a.weight"][0]) == 8
    gm = result.graph_module
    assert gm.get_parameter("g.weight").shape[:2] == (16, 4)  # 2 groups of 4 input channels
    if level == "fx":
        assert gm.g.groups == 2 and gm.g.in_channels == 8
    else:  # the group count is the 7th argument of aten.conv2d
        assert [n.args[6] for n in gm.graph.nodes if n.target == torch.ops.aten.conv2d.default
                and n.args[1].target == "g.weight"] == [2]


def test_depthwise_ties_in_and_out(level):
    model = build(Depthwise)
    analysis = fxprune.analyze(model, torch.randn(1, 3, 8, 8), level)
    expand = next(g for g in analysis.groups if g.name == "expand")
    keys = {(m.key, m.dim) for m in expand.members}
    assert {("expand.weight", 0), ("dw.weight", 0), ("project.weight", 1)} <= keys
    assert expand.size == 24


def test_l1_drops_smallest_filters():
    model = build(ConvChain)
    with torch.no_grad():
        model.c1.weight.mul_(1.0)
        model.c1.weight[3].mul_(1e-3)
        model.c1.weight[7].mul_(1e-3)
    result = fxprune.prune(model, torch.randn(1, 3, 8, 8), {"c1": 0.125})
    kept = result.plan.kept_indices["c1.weight"][0]
    assert 3 not in kept and 7 not in kept and len(kept) == 14
