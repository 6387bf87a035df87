"""Linear rules met on timm: a ``F.linear`` whose bias is built in the graph (BEiT, EVA and others
write ``F.linear(x, self.qkv.weight, torch.cat((self.q_bias, self.k_bias, self.v_bias)))``) keeps
each bias entry with its weight row, at both levels."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F



class CatBiasMLP(nn.Module):
    """fc1's bias is the concatenation of a parameter, a zero buffer and another parameter."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.fc1 = nn.Linear(6, 3 * width, bias=False)
        self.q_bias = nn.Parameter(torch.randn(width))
        self.register_buffer("k_bias", torch.zeros(width), persistent=False)
        self.v_bias = nn.Parameter(torch.randn(width))
        self.fc2 = nn.Linear(3 * width, 4)

    def forward(self, x):
        bias = torch.cat((self.q_bias, self.k_bias, self.v_bias))
        return self.fc2(F.gelu(F.linear(x, self.fc1.weight, bias)))


def test_cat_built_bias_is_tied_to_its_weight(prune_checked, level):
    torch.manual_seed(0)
    model = CatBiasMLP().eval()
    report = prune_checked(model, torch.randn(5, 6), level, sparsity=0.5)
    assert report.verify.exact and report.verify.max_abs_error < 1e-5
    kept = report.result.plan.kept_indices
    rows = kept["fc1.weight"][0]
    assert len(rows) == 12  # half of fc1's 24 rows
    assert kept["q_bias"][0] == tuple(r for r in rows if r < 8)
    assert kept["v_bias"][0] == tuple(r - 16 for r in rows if r >= 16)
