"""Parity with torch.ao's structured-pruner suite: every model of
``torch.testing._internal.common_pruning`` prunes at 50% at both levels, and the FPGM case of
torch.ao's tests picks the filter nearest the geometric median while L1 picks the smallest one."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from torch.testing._internal import common_pruning as cp

import fxprune
from fxprune.testing.check import check_pruned


MODELS = {
    "SimpleLinear": (lambda: cp.SimpleLinear(), (4, 7)),
    "LinearBias": (lambda: cp.LinearBias(), (4, 7)),
    "LinearActivation": (lambda: cp.LinearActivation(), (4, 7)),
    "LinearActivationFunctional": (lambda: cp.LinearActivationFunctional(), (4, 7)),
    "SimpleConv2d": (lambda: cp.SimpleConv2d(), (1, 1, 28, 28)),
    "Conv2dBias": (lambda: cp.Conv2dBias(), (1, 1, 28, 28)),
    "Conv2dActivation": (lambda: cp.Conv2dActivation(), (1, 1, 28, 28)),
    "Conv2dPadBias": (lambda: cp.Conv2dPadBias(), (1, 1, 28, 28)),
    "Conv2dPool": (lambda: cp.Conv2dPool(), (1, 1, 28, 28)),
    "Conv2dPoolFlatten": (lambda: cp.Conv2dPoolFlatten(), (1, 1, 28, 28)),
    "Conv2dPoolFlattenFunctional": (lambda: cp.Conv2dPoolFlattenFunctional(), (1, 1, 28, 28)),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_common_pruning_model(name, level):
    factory, shape = MODELS[name]
    torch.manual_seed(0)
    report = check_pruned(factory().eval(), torch.randn(shape), capture=level, sparsity=0.5)
    assert report.params_after < report.params_before


LSTM_MODELS = {
    "LSTMLinearModel": lambda: cp.LSTMLinearModel(8, 8, 8, num_layers=2),
    "LSTMLayerNormLinearModel": lambda: cp.LSTMLayerNormLinearModel(8, 8, 8, num_layers=2),
}


@pytest.mark.parametrize("name", sorted(LSTM_MODELS))
def test_lstm_models_expose_every_unit(name, level):
    """Both return the LSTM's output or state, so every hidden unit (one space: nn.LSTM has one
    hidden_size for all layers) reaches a graph output. With outputs fixed nothing may shrink; with
    ``prune_outputs=True`` the units go and the kept outputs still match the zeroed reference."""
    torch.manual_seed(0)
    model = LSTM_MODELS[name]().eval()
    x = torch.randn(5, 3, 8)
    fixed = fxprune.prune(model, x, 0.5, capture=level)
    assert not fixed.plan.kept_indices
    report = check_pruned(model, x, capture=level, sparsity=0.5, prune_outputs=True)
    assert report.params_after < report.params_before
    # LayerNorm statistics over the kept units: approximate, and equal to verify's reference
    assert report.verify.exact is (name == "LSTMLinearModel")
    assert report.verify.passed and report.verify.max_abs_error < 1e-4


def _fpgm_model() -> nn.Module:
    """torch.ao's FPGM test: three filters scaled 3.0, 2.0 and 0.1."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, bias=False), nn.Conv2d(3, 2, 1, bias=False)).eval()
    with torch.no_grad():
        base = torch.ones_like(model[0].weight[0])
        for i, scale in enumerate((3.0, 2.0, 0.1)):
            model[0].weight[i] = base * scale
    return model


@pytest.mark.parametrize("criterion, dropped", [("fpgm", 1), ("l1", 2)])
def test_fpgm_vs_l1(criterion, dropped, level):
    result = fxprune.prune(_fpgm_model(), torch.randn(1, 1, 5, 5), {"0": 1 / 3}, criterion=criterion,
                           capture=level)
    kept = result.plan.kept_indices["0.weight"][0]
    assert dropped not in kept and len(kept) == 2
