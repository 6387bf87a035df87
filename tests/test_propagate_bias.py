"""``propagate_bias``: a dropped channel's constant part (its bias through BN and activations) moves
into the consumers' biases, so the pruned model equals the original whose dropped filters are zeroed."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxprune
from fxprune.testing.check import check_pruned



class Unpadded(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8 * 4 * 4, 4)

    def forward(self, x):
        y = F.relu(self.c2(torch.sigmoid(self.bn(self.c1(x)))))
        return self.fc(y.flatten(1))


class Padded(Unpadded):
    def __init__(self):
        super().__init__()
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)


def _model(cls):
    torch.manual_seed(0)
    model = cls().eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-1, 1)
        model.c1.bias.uniform_(-2, 2)
    return model


def test_folded_model_equals_zeroed_filter_reference(level):
    report = check_pruned(_model(Unpadded), torch.randn(2, 3, 6, 6), capture=level, propagate_bias=True)
    assert report.verify.exact and report.verify.max_abs_error < 1e-4


def test_padded_consumer_is_reported_approximate(level):
    model = _model(Padded)
    result = fxprune.prune(model, torch.randn(2, 3, 6, 6), 0.5, capture=level, propagate_bias=True)
    assert not fxprune.verify(model, result).exact


def test_folding_changes_only_consumer_biases():
    model, x = _model(Unpadded), torch.randn(2, 3, 6, 6)
    plain = fxprune.prune(model, x, 0.5).graph_module.state_dict()
    folded = fxprune.prune(model, x, 0.5, propagate_bias=True).graph_module.state_dict()
    changed = sorted(k for k in plain if not torch.equal(plain[k], folded[k]))
    assert changed == ["c2.bias", "fc.bias"]


def test_without_folding_the_dropped_constant_is_lost():
    """The default compares with the zeroed-consumer reference, not the zeroed-filter one."""
    model, x = _model(Unpadded), torch.randn(2, 3, 6, 6)
    result = fxprune.prune(model, x, 0.5)
    reference = fxprune.core.bias_folding.constant_reference(result.analysis, result.drop)
    with torch.no_grad():
        assert (reference(x) - result.graph_module(x)).abs().max() > 1e-3
