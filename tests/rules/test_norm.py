"""Normalisation rules: BatchNorm/InstanceNorm (exact), GroupNorm by whole groups (exact),
LayerNorm/RMSNorm/GroupNorm(1) (approximate: statistics over the kept channels, which verify's reference
computes too, so every case is checked to float tolerance), PReLU per channel."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxprune



class Norms(nn.Module):
    def __init__(self, norm: nn.Module, channels: int = 16, dims: int = 2):
        super().__init__()
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
        self.c1 = conv(3, channels, 3, padding=1)
        self.norm = norm
        self.c2 = conv(channels, 4, 1)

    def forward(self, x):
        return self.c2(F.relu(self.norm(self.c1(x))))


class BatchNorm1dMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 16)
        self.bn = nn.BatchNorm1d(16)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.bn(self.fc1(x))))


class LayerNormMLP(nn.Module):
    def __init__(self, norm: nn.Module):
        super().__init__()
        self.fc1 = nn.Linear(6, 16)
        self.norm = norm
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x):
        return self.fc2(self.norm(self.fc1(x)))


class HandRMSNorm(nn.Module):
    """LLaMA's RMSNorm as HF and timm write it: ``w * x * rsqrt(mean(x**2) + eps)``."""

    def __init__(self, width: int, square: str = "pow"):
        super().__init__()
        self.weight, self.square = nn.Parameter(torch.rand(width) + 0.5), square

    def forward(self, x):
        x = x.float()
        squared = {"pow": lambda: x.pow(2), "mul": lambda: x * x, "square": lambda: torch.square(x)}[self.square]()
        return self.weight * (x * torch.rsqrt(squared.mean(-1, keepdim=True) + 1e-6))


class HandLayerNorm2d(nn.Module):
    """ConvNeXt's channels-first LayerNorm written out: centre by the channel mean, scale by the
    variance (here ``var`` itself, once, and ``mean((x - u)**2)`` in the other)."""

    def __init__(self, channels: int, use_var: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(channels) + 0.5)
        self.bias = nn.Parameter(torch.randn(channels))
        self.use_var = use_var

    def forward(self, x):
        u = x.mean(1, keepdim=True)
        s = x.var(1, keepdim=True, unbiased=False) if self.use_var else (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + 1e-6)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


def _stats(norm):
    """Give BatchNorm non-trivial running statistics so verify sees them."""
    for name, buf in norm.named_buffers():
        if "running" in name:
            buf.uniform_(0.5, 1.5)
    return norm


CASES = {
    "batchnorm1d": (lambda: BatchNorm1dMLP(), (4, 6), True),
    "batchnorm2d": (lambda: Norms(_stats(nn.BatchNorm2d(16))), (2, 3, 6, 6), True),
    "batchnorm3d": (lambda: Norms(_stats(nn.BatchNorm3d(16)), dims=3), (1, 3, 4, 4, 4), True),
    "instancenorm2d": (lambda: Norms(nn.InstanceNorm2d(16, affine=True)), (2, 3, 6, 6), True),
    # unbatched (C, H, W): the channel is dim 0 here, and num_features follows it
    "instancenorm2d_unbatched": (lambda: Norms(nn.InstanceNorm2d(16, affine=True)), (3, 6, 6), True),
    "groupnorm": (lambda: Norms(nn.GroupNorm(4, 16)), (2, 3, 6, 6), True),
    "groupnorm1": (lambda: Norms(nn.GroupNorm(1, 16)), (2, 3, 6, 6), False),
    "layernorm": (lambda: LayerNormMLP(nn.LayerNorm(16)), (4, 6), False),
    "rmsnorm": (lambda: LayerNormMLP(nn.RMSNorm(16)), (4, 6), False),
    "rmsnorm_by_hand_pow": (lambda: LayerNormMLP(HandRMSNorm(16, "pow")), (4, 6), False),
    "rmsnorm_by_hand_mul": (lambda: LayerNormMLP(HandRMSNorm(16, "mul")), (4, 6), False),
    "rmsnorm_by_hand_square": (lambda: LayerNormMLP(HandRMSNorm(16, "square")), (4, 6), False),
    "layernorm2d_by_hand_mean": (lambda: Norms(HandLayerNorm2d(16, use_var=False)), (2, 3, 6, 6), False),
    "layernorm2d_by_hand_var": (lambda: Norms(HandLayerNorm2d(16, use_var=True)), (2, 3, 6, 6), False),
    "prelu": (lambda: Norms(nn.PReLU(16)), (2, 3, 6, 6), True),
    "prelu_shared": (lambda: Norms(nn.PReLU(1)), (2, 3, 6, 6), True),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_norm_prunes_and_verifies(prune_checked, case, level):
    factory, shape, exact = CASES[case]
    torch.manual_seed(0)
    with torch.no_grad():
        model = factory().eval()
    report = prune_checked(model, torch.randn(shape), level, sparsity=0.5)
    assert report.verify.exact is exact
    assert report.verify.passed and report.verify.max_abs_error < 1e-4


def test_groupnorm_keeps_whole_groups(level):
    torch.manual_seed(0)
    model = Norms(nn.GroupNorm(4, 16)).eval()
    result = fxprune.prune(model, torch.randn(2, 3, 6, 6), 0.5, capture=level)
    kept = result.plan.kept_indices["norm.weight"][0]
    assert len(kept) == 8 and sorted({i // 4 for i in kept}) == [i // 4 for i in kept[::4]]
    gm = result.graph_module
    if level == "fx":
        assert gm.norm.num_groups == 2
    else:  # the group count is a literal of the ATen call
        calls = [n for n in gm.graph.nodes if n.target == torch.ops.aten.group_norm.default]
        assert [n.args[1] for n in calls] == [2]


def test_layernorm_group_is_marked_approximate(level):
    torch.manual_seed(0)
    analysis = fxprune.analyze(LayerNormMLP(nn.LayerNorm(16)).eval(), torch.randn(4, 6), level)
    group = next(g for g in analysis.groups if g.name == "fc1")
    assert not group.exact


def test_bn_scale_criterion_reads_batchnorm_weights():
    torch.manual_seed(0)
    model = Norms(nn.BatchNorm2d(16)).eval()
    with torch.no_grad():
        model.norm.weight.copy_(torch.arange(1, 17, dtype=torch.float))
    result = fxprune.prune(model, torch.randn(1, 3, 6, 6), 0.5, criterion="bn_scale")
    assert result.plan.kept_indices["norm.weight"][0] == tuple(range(8, 16))


def test_training_mode_batchnorm_at_export_level_is_refused():
    model = Norms(nn.BatchNorm2d(16)).train()
    with pytest.raises(fxprune.errors.TrainingModeError, match="norm"):
        fxprune.prune(model, torch.randn(2, 3, 6, 6), 0.5, capture="export")


def test_training_mode_batchnorm_at_fx_level_keeps_mode_and_stats():
    torch.manual_seed(0)
    model = Norms(nn.BatchNorm2d(16)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = fxprune.prune(model, torch.randn(2, 3, 6, 6), 0.5, capture="fx")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert result.graph_module.training and result.graph_module.norm.training
    assert fxprune.verify(model, result).passed
