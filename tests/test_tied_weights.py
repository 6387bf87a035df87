"""Tied weights (an embedding table reused as the output projection) are one tensor: analysis ties
both uses, the plan names it once, and the pruned model still shares one parameter."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import fxprune
from fxprune.testing.check import check_pruned


class TiedLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(30, 16)
        self.mlp = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))
        self.head = nn.Linear(16, 30, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        h = self.embed(ids)
        return self.head(h + self.mlp(h))


def test_tied_weight_stays_tied(level):
    torch.manual_seed(0)
    model = TiedLM().eval()
    ids = torch.randint(0, 30, (2, 5))
    report = check_pruned(model, ids, capture=level, sparsity=0.5)
    gm = report.result.graph_module
    assert gm.get_parameter("head.weight") is gm.get_parameter("embed.weight")  # both levels
    assert report.params_after < report.params_before
    assert [k for k in report.result.plan.kept_indices if k.endswith("weight") and "mlp" not in k] == \
        ["embed.weight"]
