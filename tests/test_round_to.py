"""``round_to``: kept *channel* counts are a multiple of N. A unit that ties several channels (a whole
attention head, head_dim channels) counts as that many, so rounding never forces heads to stay."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.models import VisionTransformer

import fxprune
from fxprune.core.select import round_up_units, unit_width


@pytest.mark.parametrize("keep,round_to,width,expected", [
    (6, 1, 1, 6), (6, 16, 1, 16), (45, 8, 1, 48),
    (6, 16, 64, 6),  # six 64-channel heads are 384 channels: aligned already
    (5, 16, 12, 8),  # 12-channel units: 4 of them are 48 channels, so 5 -> 8 (96 channels)
    (3, 8, 12, 4),
])
def test_round_up_units(keep, round_to, width, expected):
    assert round_up_units(keep, round_to, width) == expected
    assert (expected * width) % round_to == 0


class Wide(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 32, 3), nn.Conv2d(32, 8, 3)

    def forward(self, x):
        return self.conv2(torch.relu(self.conv1(x)))


def test_round_to_rounds_channels_up(level):
    torch.manual_seed(0)
    result = fxprune.prune(Wide().eval(), torch.randn(1, 3, 8, 8), sparsity=0.3, round_to=8, capture=level)
    assert result.graph_module.get_parameter("conv1.weight").shape[0] == 24  # 32 - 9 = 23, rounded up


def _vit() -> nn.Module:
    return VisionTransformer(image_size=32, patch_size=8, num_layers=1, num_heads=4, hidden_dim=32,
                             mlp_dim=64, num_classes=10).eval()


ATTENTION = "encoder.layers.encoder_layer_0.self_attention"
TIED_UNITS = {  # level: (group, channels per unit, parameter, rows kept at 50%)
    # fx: the residual stream prunes in head-sized units (4 heads of 8 channels): 2 of 4 kept
    "fx": ("conv_proj", 8, "conv_proj.weight", 16),
    # export: head_dim positions, one per q/k/v of every head (12 rows of in_proj each): 4 of 8 kept
    "export": (ATTENTION, 12, f"{ATTENTION}.in_proj_weight", 48),
}


def test_round_to_does_not_keep_tied_units_whole(level):
    # rounding the *unit* count up to 8 or 16 kept all of them: nothing was pruned there
    torch.manual_seed(0)
    model, x = _vit(), torch.randn(1, 3, 32, 32)
    name, width, key, rows = TIED_UNITS[level]
    kept = {}
    for round_to in (1, 8, 16):
        result = fxprune.prune(model, x, sparsity=0.5, round_to=round_to, capture=level)
        group = next(g for g in result.analysis.groups if g.name == name)
        assert unit_width(result.analysis, group) == width
        kept[round_to] = result.graph_module.get_parameter(key).shape[0]
    assert kept == {1: rows, 8: rows, 16: rows}
