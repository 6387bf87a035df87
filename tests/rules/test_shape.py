"""Shape rules: flatten into a Linear, view/reshape, permute/transpose, cat/split/chunk/slicing with
exact offsets, channel shuffle with shared local indices, DenseNet-style growth."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxprune



class FlattenMLP(nn.Module):
    """Conv features flattened into an MLP: a channel becomes a block of 16 features."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc1 = nn.Linear(8 * 4 * 4, 32)
        self.fc2 = nn.Linear(32, 5)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv(x)), 2)
        x = torch.flatten(x, 1)
        return self.fc2(F.relu(self.fc1(x)))


class ViewReshape(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 1)
        self.fc = nn.Linear(6 * 9, 4)

    def forward(self, x):
        y = self.conv(x).view(x.size(0), -1)
        return self.fc(y.reshape(2, 54))


class PermuteLinear(nn.Module):
    """ConvNeXt-style: channels-last Linear between permutes."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 8)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        y = self.conv(x).permute(0, 2, 3, 1)
        y = self.fc2(F.gelu(self.fc1(y)))
        return self.head(y.transpose(1, 3).transpose(2, 3))


class Inception(nn.Module):
    """Branches concatenated on channels, then split again."""

    def __init__(self):
        super().__init__()
        self.b1 = nn.Conv2d(3, 4, 1)
        self.b2 = nn.Conv2d(3, 6, 3, padding=1)
        self.b3 = nn.Conv2d(3, 8, 1)
        self.mix = nn.Conv2d(18, 8, 1)
        self.left = nn.Conv2d(6, 2, 1)
        self.right = nn.Conv2d(2, 2, 1)

    def forward(self, x):
        y = torch.cat([self.b1(x), self.b2(x), F.relu(self.b3(x))], dim=1)
        z = self.mix(y)
        a, b = torch.split(z, [6, 2], dim=1)
        return self.left(a) + self.right(b)


class Chunked(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 12, 1)
        self.h1 = nn.Conv2d(6, 2, 1)
        self.h2 = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        a, b = self.conv(x).chunk(2, dim=1)
        return self.h1(a) * self.h2(b)


class Sliced(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 12, 1)
        self.h1 = nn.Conv2d(4, 2, 1)
        self.h2 = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        y = self.conv(x)
        return self.h1(y[:, :4]) + self.h2(y[:, 4:])


class Shuffle(nn.Module):
    """ShuffleNetV2 unit: chunk, branch, cat, channel shuffle (view/transpose/view), twice."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 1)
        self.branch1 = nn.Sequential(nn.Conv2d(8, 8, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=8),
                                     nn.Conv2d(8, 8, 1), nn.ReLU())
        self.branch2 = nn.Sequential(nn.Conv2d(8, 8, 1), nn.ReLU(), nn.Conv2d(8, 8, 1), nn.ReLU())
        self.head = nn.Conv2d(16, 3, 1)

    @staticmethod
    def shuffle(x, groups: int = 2):
        b, c, h, w = x.shape
        x = x.view(b, groups, c // groups, h, w).transpose(1, 2).contiguous()
        return x.view(b, c, h, w)

    def forward(self, x):
        x = self.stem(x)
        for branch in (self.branch1, self.branch2):
            left, right = x.chunk(2, dim=1)
            x = self.shuffle(torch.cat([left, branch(right)], dim=1))
        return self.head(x)


class Dense(nn.Module):
    """DenseNet-style growth: each layer concatenates its output onto the features."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.layers = nn.ModuleList([nn.Sequential(nn.BatchNorm2d(8 + 4 * i), nn.ReLU(),
                                                   nn.Conv2d(8 + 4 * i, 4, 3, padding=1)) for i in range(3)])
        self.transition = nn.Conv2d(20, 6, 1)

    def forward(self, x):
        features = [self.stem(x)]
        for layer in self.layers:
            features.append(layer(torch.cat(features, 1)))
        return F.avg_pool2d(self.transition(torch.cat(features, 1)), 2)


class Dims(nn.Module):
    """unsqueeze/squeeze/expand/stack around channels."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 10)
        self.fc2 = nn.Linear(10, 3)

    def forward(self, x):
        h = self.fc1(x).unsqueeze(1)
        h = h.expand(-1, 3, -1)
        h = torch.stack([h, h * 2], dim=1).sum(1)
        return self.fc2(h.mean(1).unsqueeze(0).squeeze(0))


CASES = {
    "flatten_mlp": (FlattenMLP, (2, 3, 8, 8)),
    "view_reshape": (ViewReshape, (2, 3, 3, 3)),
    "permute_linear": (PermuteLinear, (2, 3, 5, 5)),
    "inception": (Inception, (1, 3, 6, 6)),
    "chunked": (Chunked, (1, 3, 4, 4)),
    "sliced": (Sliced, (1, 3, 4, 4)),
    "shuffle": (Shuffle, (1, 3, 4, 4)),
    "dense": (Dense, (1, 3, 6, 6)),
    "dims": (Dims, (2, 4)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_shape_rules_prune_and_verify(prune_checked, case, level):
    factory, shape = CASES[case]
    torch.manual_seed(0)
    model = factory().eval()
    prune_checked(model, torch.randn(shape), level)


def test_flatten_maps_channel_to_feature_block(level):
    torch.manual_seed(0)
    result = fxprune.prune(FlattenMLP().eval(), torch.randn(2, 3, 8, 8), {"conv": 0.5}, capture=level)
    kept_channels = result.plan.kept_indices["conv.weight"][0]
    kept_features = result.plan.kept_indices["fc1.weight"][1]
    assert kept_features == tuple(c * 16 + p for c in kept_channels for p in range(16))


def test_cat_and_split_map_offsets(level):
    torch.manual_seed(0)
    result = fxprune.prune(Inception().eval(), torch.randn(1, 3, 6, 6), 0.5, capture=level)
    kept = result.plan.kept_indices
    b1, b2 = kept["b1.weight"][0], kept["b2.weight"][0]
    assert kept["mix.weight"][1][: len(b1) + len(b2)] == b1 + tuple(4 + i for i in b2)
    left = kept["left.weight"][1]
    assert kept["mix.weight"][0][: len(left)] == left


def test_channel_shuffle_keeps_shared_local_indices(level):
    torch.manual_seed(0)
    result = fxprune.prune(Shuffle().eval(), torch.randn(1, 3, 4, 4), 0.5, capture=level)
    kept = result.plan.kept_indices
    # after a shuffle, positions 2j and 2j+1 hold the same unit (left[j] and branch[j] share local
    # index j), so the next branch's input columns are kept in pairs that follow the stem's channels
    inputs = kept["branch2.0.weight"][1]
    assert len(inputs) % 2 == 0 and all(inputs[i] + 1 == inputs[i + 1] and inputs[i] % 2 == 0
                                        for i in range(0, len(inputs), 2))
    stem_right_of_left_half = {4 + i // 2 for i in inputs}
    assert stem_right_of_left_half == {c for c in kept["stem.weight"][0] if 4 <= c < 8}
