"""Element-wise rules: torch.ao's 21 activations as modules and functions, arithmetic merges
(residuals, squeeze-excitation gating), and the conservative cases that must freeze."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxprune
from fxprune.testing.check import check_pruned
from fxprune.core.rules.elementwise import ACTIVATION_FUNCTIONS, ACTIVATION_MODULES

# The 21 activations of torch.ao's structured pruner (PReLU has weights: see test_norm.py).
AO_MODULES = [nn.ReLU, nn.RReLU, nn.Hardtanh, nn.ReLU6, nn.Sigmoid, nn.Hardsigmoid, nn.Tanh, nn.SiLU,
              nn.Mish, nn.Hardswish, nn.ELU, nn.CELU, nn.SELU, nn.Hardshrink, nn.LeakyReLU,
              nn.LogSigmoid, nn.Softplus, nn.PReLU, nn.Softsign, nn.Tanhshrink, nn.GELU]
AO_FUNCTIONS = [F.relu, F.rrelu, F.hardtanh, F.relu6, F.sigmoid, F.hardsigmoid, F.tanh, F.silu, F.mish,
                F.hardswish, F.elu, F.celu, F.selu, F.hardshrink, F.leaky_relu, F.logsigmoid, F.softplus,
                F.prelu, F.softsign, F.tanhshrink, F.gelu]


class WithModule(nn.Module):
    def __init__(self, act: nn.Module):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(5, 12), act, nn.Linear(12, 3)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class WithFunction(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn
        self.fc1, self.fc2 = nn.Linear(5, 12), nn.Linear(12, 3)
        self.slope = nn.Parameter(torch.full((1,), 0.25))

    def forward(self, x):
        h = self.fc1(x)
        h = self.fn(h, self.slope) if self.fn is F.prelu else self.fn(h)
        return self.fc2(h)


def test_rule_table_covers_torch_ao_activations():
    assert len(AO_MODULES) == 21 and len(AO_FUNCTIONS) == 21
    assert set(AO_MODULES) - {nn.PReLU} <= set(ACTIVATION_MODULES)
    assert set(AO_FUNCTIONS) - {F.prelu} <= set(ACTIVATION_FUNCTIONS)


@pytest.mark.parametrize("act", AO_MODULES, ids=lambda a: a.__name__)
def test_activation_module(act, level):
    torch.manual_seed(0)
    report = fxprune.testing.check.check_pruned(WithModule(act()).eval(), torch.randn(4, 5), capture=level)
    assert report.verify.max_abs_error < 1e-5


@pytest.mark.parametrize("fn", AO_FUNCTIONS, ids=lambda f: f.__name__)
def test_activation_function(fn, level):
    torch.manual_seed(0)
    report = fxprune.testing.check.check_pruned(WithFunction(fn).eval(), torch.randn(4, 5), capture=level)
    assert report.verify.max_abs_error < 1e-5


class Residual(nn.Module):
    """Two convs merged by add, sub, mul and div: one group of tied channels."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(3, 8, 1)
        self.c = nn.Conv2d(3, 8, 1)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        y = (self.a(x) + self.b(x)) * torch.sigmoid(self.c(x))
        y = y - self.a(x) / (1 + torch.exp(self.b(x)))
        return self.head(y)


class SqueezeExcite(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.squeeze = nn.Conv2d(16, 4, 1)
        self.excite = nn.Conv2d(4, 16, 1)
        self.head = nn.Conv2d(16, 2, 1)

    def forward(self, x):
        x = F.relu(self.conv(x))
        s = F.adaptive_avg_pool2d(x, 1)
        s = torch.sigmoid(self.excite(F.relu(self.squeeze(s))))
        return self.head(x * s)


class LayerScale(nn.Module):
    """A loose per-channel parameter multiplying the stream (ConvNeXt's layer scale)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.gamma = nn.Parameter(torch.rand(8, 1, 1))
        self.shift = nn.Parameter(torch.rand(8, 1, 1))
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.head(self.conv(x) * self.gamma + self.shift)


class Gated(nn.Module):
    """GLU over conv channels (a module) and over linear features (the function)."""

    def __init__(self):
        super().__init__()
        self.conv, self.glu = nn.Conv2d(3, 8, 1), nn.GLU(dim=1)
        self.fc1, self.fc2 = nn.Linear(4, 12), nn.Linear(6, 2)

    def forward(self, x):
        return self.fc2(F.glu(self.fc1(self.glu(self.conv(x)).mean((2, 3)))))


@pytest.mark.parametrize("case", [Residual, SqueezeExcite, LayerScale, Gated], ids=lambda c: c.__name__)
def test_merges(prune_checked, case, level):
    torch.manual_seed(0)
    report = prune_checked(case().eval(), torch.randn(2, 3, 6, 6), level)
    assert report.verify.exact and report.verify.max_abs_error < 1e-5


def test_glu_keeps_both_halves_of_a_unit(level):
    torch.manual_seed(0)
    analysis = fxprune.analyze(Gated().eval(), torch.randn(1, 3, 6, 6), level)
    assert {g.name: g.size for g in analysis.groups if g.prunable} == {"conv": 4, "fc1": 6}


def test_residual_ties_both_branches(level):
    torch.manual_seed(0)
    analysis = fxprune.analyze(Residual().eval(), torch.randn(1, 3, 4, 4), level)
    group = next(g for g in analysis.groups if g.name in ("a", "b", "c"))
    producers = {m.key for m in group.members if m.producer}
    assert producers == {"a.weight", "b.weight", "c.weight"} and group.size == 8


class AddInput(nn.Module):
    """Adding a graph input ties channels to a fixed interface: they must stay."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.head = nn.Conv2d(3, 2, 1)

    def forward(self, x):
        return self.head(self.conv(x) + x)


def test_add_graph_input_freezes(level):
    analysis = fxprune.analyze(AddInput().eval(), torch.randn(1, 3, 4, 4), level)
    group = next(g for g in analysis.groups if g.name == "conv")
    assert not group.prunable and "no channels" in group.reasons[0]


class Unknown(nn.Module):
    """An op without a rule (torch.fft) freezes what it touches and says so."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        y = self.conv(x)
        return self.head(torch.fft.fft(y, dim=1).real)


def test_unknown_op_freezes_with_reason(level):
    analysis = fxprune.analyze(Unknown().eval(), torch.randn(1, 3, 4, 4), level)
    group = next(g for g in analysis.groups if g.name == "conv")
    assert not group.prunable and "no rule" in group.reasons[0] and "fft" in group.reasons[0]
    result = fxprune.prune(Unknown().eval(), torch.randn(1, 3, 4, 4), 0.5, capture=level)
    assert "conv.weight" not in result.plan.kept_indices


class Hooked(nn.Module):
    """A layer with a forward hook (per-channel gains fxprune cannot see) between two prunable ones."""

    def __init__(self):
        super().__init__()
        self.conv, self.mid, self.head = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 2, 1)
        self.mid.register_forward_hook(lambda m, args, out: out * torch.arange(1.0, 9.0).view(1, 8, 1, 1))

    def forward(self, x):
        return self.head(torch.relu(self.mid(torch.relu(self.conv(x)))))


def test_a_hooked_layer_freezes_what_it_touches(level):
    # fx: the hooked call_module freezes its input and output channels (its own weights stay whole);
    # export: the hook is traced, and its constant gains freeze the output channels
    torch.manual_seed(0)
    analysis = fxprune.analyze(Hooked().eval(), torch.randn(1, 3, 4, 4), level)
    if level == "fx":
        conv = next(g for g in analysis.groups if g.name == "conv")
        assert not conv.prunable and "forward hooks" in conv.reasons[0]
    mid = next((g for g in analysis.groups if g.name == "mid"), None)  # fx: never opened as a producer
    assert mid is None or not mid.prunable
    report = check_pruned(Hooked().eval(), torch.randn(2, 3, 4, 4), capture=level, expect_shrink=level == "export")
    assert report.verify.exact
