"""Channel and pixel shuffles: block-structured channel permutations prune by whole blocks, exactly."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxprune



class Shuffled(nn.Module):
    """conv (16 channels) -> a shuffle -> a consumer conv."""

    def __init__(self, shuffle: nn.Module, consumer_in: int):
        super().__init__()
        self.conv, self.shuffle, self.out = nn.Conv2d(3, 16, 1), shuffle, nn.Conv2d(consumer_in, 5, 1)

    def forward(self, x):
        return self.out(torch.relu(self.shuffle(self.conv(x))))


class Functional(nn.Module):
    """All three as functions, back to back: shuffle channels, to space and back."""

    def __init__(self):
        super().__init__()
        self.conv, self.out = nn.Conv2d(3, 16, 1), nn.Conv2d(16, 5, 1)

    def forward(self, x):
        y = F.pixel_unshuffle(F.pixel_shuffle(F.channel_shuffle(self.conv(x), 4), 2), 2)
        return self.out(y)


def build(case: str) -> nn.Module:
    torch.manual_seed(0)
    return CASES[case][0]().eval()


CASES = {
    "channel_shuffle": (lambda: Shuffled(nn.ChannelShuffle(4), 16), 4),
    "pixel_shuffle": (lambda: Shuffled(nn.PixelShuffle(2), 4), 4),
    "pixel_unshuffle": (lambda: Shuffled(nn.PixelUnshuffle(2), 64), 16),
    "functional": (Functional, 4),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("batched", [True, False])
def test_shuffle_prunes_and_verifies(prune_checked, case, level, batched):
    shape = (2, 3, 4, 4) if batched else (3, 4, 4)
    report = prune_checked(build(case), torch.randn(shape), level, sparsity=0.5, snapshot=batched)
    assert report.verify.exact and report.verify.max_abs_error < 1e-5


@pytest.mark.parametrize("case", sorted(CASES))
def test_shuffle_units_are_blocks(case, level):
    analysis = fxprune.analyze(build(case), torch.randn(1, 3, 4, 4), level)
    group = next(g for g in analysis.groups if g.name == "conv")
    assert group.prunable and group.size == CASES[case][1]


def test_channel_shuffle_keeps_the_same_local_indices_in_every_group(level):
    result = fxprune.prune(build("channel_shuffle"), torch.randn(1, 3, 4, 4), 0.5, capture=level)
    weight = result.graph_module.get_parameter("conv.weight")
    original = build("channel_shuffle").conv.weight
    rows = [next(i for i in range(16) if torch.equal(original[i], w)) for w in weight]
    local = torch.tensor(rows).view(4, -1) % 4  # conv channel 4*j + i is local index i of group j
    assert torch.equal(local, local[:1].expand_as(local)), f"groups kept different local indices: {rows}"
