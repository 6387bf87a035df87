"""Pooling, resampling, padding and reductions: channels pass through pooling; a sum over channels is
an exact contraction; a mean/max/softmax over channels freezes them unless it is a norm's statistic
(tests/rules/test_norm.py)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxprune



class Pools(nn.Module):
    def __init__(self, dims: int, pool: nn.Module):
        super().__init__()
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
        self.c1, self.pool, self.c2 = conv(2, 8, 3, padding=1), pool, conv(8, 3, 1)

    def forward(self, x):
        return self.c2(self.pool(torch.relu(self.c1(x))))


class Functional(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(2, 8, 3, padding=1), nn.Conv2d(8, 3, 1)

    def forward(self, x):
        y = torch.relu(self.c1(x))
        y = F.max_pool2d(y, 2) + F.avg_pool2d(y, 2)
        y = F.interpolate(y, scale_factor=2.0, mode="nearest") + F.adaptive_avg_pool2d(y, 8)
        y = F.pad(y, (1, 1, 1, 1))
        return self.c2(y)


class Resampled(nn.Module):
    """The other resampling modes, each its own ATen op at the export level."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(2, 8, 3, padding=1), nn.Conv2d(8, 3, 1)

    def forward(self, x):
        y = torch.relu(self.c1(x))
        y = F.interpolate(y, scale_factor=2.0, mode="nearest-exact") + \
            F.interpolate(y, scale_factor=2.0, mode="bicubic", antialias=True) + \
            F.interpolate(y, scale_factor=2.0, mode="bilinear", antialias=True)
        return self.c2(y)


class SumOverChannels(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 8, 1)
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        return self.fc(self.c1(x).sum(dim=1).flatten(1))


def _channel_mean(y):
    return y.mean(dim=1, keepdim=True)


def _channel_max_of_squares(y):
    return (y * y).amax(dim=1, keepdim=True)


class ChannelStatistic(nn.Module):
    """CBAM-style spatial attention: a statistic over channels (a mean by default) depends on how many
    there are."""

    def __init__(self, statistic=_channel_mean):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(2, 8, 1), nn.Conv2d(8, 3, 1)
        self.statistic = statistic

    def forward(self, x):
        y = self.c1(x)
        return self.c2(y * torch.sigmoid(self.statistic(y)))


CASES = {
    "maxpool1d": (lambda: Pools(1, nn.MaxPool1d(2)), (2, 2, 8)),
    "avgpool2d": (lambda: Pools(2, nn.AvgPool2d(2)), (2, 2, 8, 8)),
    "adaptive_avg3d": (lambda: Pools(3, nn.AdaptiveAvgPool3d(2)), (1, 2, 4, 4, 4)),
    "adaptive_max2d": (lambda: Pools(2, nn.AdaptiveMaxPool2d(3)), (2, 2, 8, 8)),
    "maxpool3d": (lambda: Pools(3, nn.MaxPool3d(2)), (1, 2, 4, 4, 4)),
    "avgpool1d": (lambda: Pools(1, nn.AdaptiveAvgPool1d(3)), (2, 2, 8)),
    "upsample": (lambda: Pools(2, nn.Upsample(scale_factor=2)), (1, 2, 4, 4)),
    "lppool3d": (lambda: Pools(3, nn.LPPool3d(2, 2)), (1, 2, 4, 4, 4)),
    "reflection_pad3d": (lambda: Pools(3, nn.ReflectionPad3d(1)), (1, 2, 4, 4, 4)),
    # unbatched (C, H, W): the channel is dim 0, the pooled or padded dims are the last two
    "maxpool2d_unbatched": (lambda: Pools(2, nn.MaxPool2d(2)), (2, 8, 8)),
    "circular_pad2d_unbatched": (lambda: Pools(2, nn.CircularPad2d(1)), (2, 8, 8)),
    "functional": (Functional, (1, 2, 8, 8)),
    "resampled": (Resampled, (1, 2, 8, 8)),
    "sum_over_channels": (SumOverChannels, (2, 2, 4, 4)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_pool_prunes_and_verifies(prune_checked, case, level):
    factory, shape = CASES[case]
    torch.manual_seed(0)
    prune_checked(factory().eval(), torch.randn(shape), level)


def test_sum_over_channels_is_an_exact_consumer(level):
    torch.manual_seed(0)
    analysis = fxprune.analyze(SumOverChannels().eval(), torch.randn(1, 2, 4, 4), level)
    assert [g.prunable for g in analysis.groups if g.name == "c1"] == [True]
    assert analysis.act_sinks, "the sum must be recorded as a contraction for verify"


@pytest.mark.parametrize("statistic,reason", [
    (_channel_mean, "mean"),
    # only a *mean* of squares is a norm's statistic (RMSNorm); a max of them depends on every channel
    (_channel_max_of_squares, "a mean/max/norm over a channel dim"),
], ids=["mean", "max_of_squares"])
def test_a_statistic_over_channels_freezes(level, statistic, reason):
    torch.manual_seed(0)
    analysis = fxprune.analyze(ChannelStatistic(statistic).eval(), torch.randn(1, 2, 4, 4), level)
    group = next(g for g in analysis.groups if g.name == "c1")
    assert not group.prunable and reason in group.reasons[0]


def test_pooling_over_a_channel_dim_freezes(level):
    # a conv's channels moved onto a pooled dim: pooling mixes them, so they stay
    class Moved(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.fc = nn.Conv1d(2, 8, 1), nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(F.max_pool1d(self.c1(x).transpose(1, 2), 2))

    torch.manual_seed(0)
    analysis = fxprune.analyze(Moved().eval(), torch.randn(1, 2, 6), level)
    group = next(g for g in analysis.groups if g.name == "c1")
    assert not group.prunable and "pooling or resampling along a channel dim" in group.reasons[0]
