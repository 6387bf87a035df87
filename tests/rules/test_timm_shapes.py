"""Sizes computed at run time from a tensor's shape, as timm's attention blocks write them (CaiT, XCiT,
VOLO, DaViT, EdgeNeXt, Swin V2 CR: ``B, N, C = x.shape``, ``reshape(B, N, 3, heads, C // heads)``,
``reshape(B, N, C)``), meeting channels that are pruned differently. At the fx level those numbers are
recomputed from the pruned tensors: a view they size gets the pruned literal in their place, and any
other op that reads one freezes the dims it measures. A pruned graph that still fails is fxprune's
error (:class:`~fxprune.errors.PrunedGraphError`), never the user's inputs'."""
from __future__ import annotations

import pytest
import torch
import torch.fx as fx
import torch.nn as nn

import fxprune
from fxprune.core.capture import capture, propagate_values
from fxprune.errors import ExampleInputError, PrunedGraphError



class ShapeArithmeticAttention(nn.Module):
    """The residual stream (fc_in's width C) and the attention's q/k/v width are different groups,
    but the attention sizes its views from the stream's shape."""

    def __init__(self, dim: int = 16, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.fc_in = nn.Linear(6, dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, 4)

    def forward(self, x):
        x = self.fc_in(x)
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = (q @ k.transpose(-2, -1)).softmax(dim=-1)
        y = (attn @ v).transpose(1, 2).reshape(B, N, C)
        return self.head(x + self.proj(y))


class RepeatedBySize(nn.Module):
    """A count computed from fc_in's width (``C // 8``) repeats another layer's output: ``repeat``
    cannot follow a pruned count, so fc_in's channels stay; the MLP's hidden units still prune."""

    def __init__(self):
        super().__init__()
        self.fc_in = nn.Linear(6, 16)
        self.fc2 = nn.Linear(16, 8)
        self.mlp_in, self.mlp_out = nn.Linear(16, 12), nn.Linear(12, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        x = self.fc_in(x)
        h = torch.relu(self.fc2(x)).repeat(1, 1, x.shape[-1] // 8)
        return self.head(h + x + self.mlp_out(torch.relu(self.mlp_in(x))))


def test_views_sized_from_another_groups_shape(prune_checked, level):
    torch.manual_seed(0)
    model = ShapeArithmeticAttention().eval()
    # the stream halves while q/k/v keep their width: C // heads at run time is no longer head_dim
    report = prune_checked(model, torch.randn(2, 5, 6), level, sparsity=0.5, ignore=["qkv"])
    assert report.verify.exact and report.verify.max_abs_error < 1e-5
    kept = report.result.plan.kept_indices
    assert len(kept["fc_in.weight"][0]) == 8 and 0 not in kept["qkv.weight"]  # its rows all stay


def test_a_size_read_by_repeat_freezes_what_it_measures(prune_checked):
    torch.manual_seed(0)
    model = RepeatedBySize().eval()
    analysis = fxprune.analyze(model, torch.randn(2, 5, 6), "fx")
    stream = next(g for g in analysis.groups if "fc_in.weight" in g.name or g.name == "fc_in")
    assert not stream.prunable or stream.frozen_units
    assert any("read from the tensor's shape at run time" in r for r in stream.reasons)
    report = prune_checked(model, torch.randn(2, 5, 6), "fx", sparsity=0.5)
    kept = report.result.plan.kept_indices
    assert report.verify.exact and "fc_in.weight" not in kept and len(kept["mlp_in.weight"][0]) == 6


def test_a_pruned_graph_that_fails_is_fxprunes_error_naming_the_node():
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    x = torch.randn(2, 6)
    gm = capture(model, (x,), "fx").gm
    broken = fx.GraphModule({"0": nn.Linear(6, 4), "1": nn.ReLU(), "2": nn.Linear(8, 3)}, gm.graph)
    with pytest.raises(PrunedGraphError, match=r"pruned graph fails at node '_2' \(module '2'\).*bug in fxprune"):
        propagate_values(broken, (x,), rewritten=True)
    with pytest.raises(ExampleInputError, match=r"rejects example inputs of shapes \[\(2, 6\)\] at node '_2'"):
        propagate_values(broken, (x,))


class LinearNorm(nn.Module):
    """LeViT's LinearNorm: a BatchNorm1d over the flattened tokens, reshaped back as its input."""

    def __init__(self, inputs: int, outputs: int):
        super().__init__()
        self.linear = nn.Linear(inputs, outputs, bias=False)
        self.bn = nn.BatchNorm1d(outputs)

    def forward(self, x):
        x = self.linear(x)
        return self.bn(x.flatten(0, 1)).reshape_as(x)


class LeViTMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln1, self.ln2 = LinearNorm(6, 16), LinearNorm(16, 4)

    def forward(self, x):
        return self.ln2(nn.functional.hardswish(self.ln1(x)))


def test_reshape_as_ties_dims_to_the_other_tensor(prune_checked, level):
    torch.manual_seed(0)
    model = LeViTMLP().eval()
    with torch.no_grad():
        for bn in (model.ln1.bn, model.ln2.bn):
            bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 1.5)
    report = prune_checked(model, torch.randn(2, 5, 6), level, sparsity=0.5)
    assert report.verify.exact and report.verify.max_abs_error < 1e-5
    assert len(report.result.plan.kept_indices["ln1.linear.weight"][0]) == 8
