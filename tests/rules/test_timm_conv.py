"""Conv rules met on timm: channels on a conv's length dim. CoaT stacks the class tokens of its stages
and convolves across them (``Conv1d(3, 1, 1)`` over ``(B, 3, C)``: the conv's length is the channels);
a kernel of 1 passes them through, so the classifier's input columns prune with them; a wider kernel
mixes neighbouring channels and freezes them."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import fxprune



class StackedTokensHead(nn.Module):
    def __init__(self, kernel: int = 1):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(6, 16), nn.Linear(6, 16), nn.Linear(6, 16)
        self.aggregate = nn.Conv1d(3, 1, kernel, padding=kernel // 2)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        tokens = torch.stack([self.a(x), self.b(x), self.c(x)], dim=1)  # (B, 3, 16)
        return self.head(self.aggregate(tokens).squeeze(1))


def test_pointwise_conv_across_stacked_tokens_passes_channels(prune_checked, level):
    torch.manual_seed(0)
    report = prune_checked(StackedTokensHead().eval(), torch.randn(2, 6), level, sparsity=0.5)
    assert report.verify.exact and report.verify.max_abs_error < 1e-5
    kept = report.result.plan.kept_indices
    assert kept["head.weight"][1] == kept["a.weight"][0] == kept["c.weight"][0]
    assert len(kept["head.weight"][1]) == 8


def test_wider_conv_along_channels_freezes_them(level):
    torch.manual_seed(0)
    analysis = fxprune.analyze(StackedTokensHead(kernel=3).eval(), torch.randn(2, 6), level)
    group = next(g for g in analysis.groups if g.name in ("a", "a.weight"))
    assert not group.prunable and any("conv's spatial dim" in r for r in group.reasons)
