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


# --- a chunk's pieces stay equal (fxprune.core.lockstep) ------------------------------------------
class CatChunked(nn.Module):
    """Two convs concatenated, then chunked: the halves come from different producers, so the lockstep
    ties the two groups into one selection."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 6, 1), nn.Conv2d(3, 6, 1)
        self.h1, self.h2 = nn.Conv2d(6, 2, 1), nn.Conv2d(6, 2, 1)

    def forward(self, x):
        left, right = torch.cat([self.a(x), self.b(x)], 1).chunk(2, dim=1)
        return self.h1(left) + self.h2(right)


class C2fLike(nn.Module):
    """YOLO's C2f (``list(cv1(x).chunk(2, 1))`` there; unpacked here, which fx traces): the second half
    through a residual block, all three concatenated."""

    def __init__(self):
        super().__init__()
        self.cv1 = nn.Conv2d(3, 20, 1)
        self.m = nn.Sequential(nn.Conv2d(10, 10, 3, padding=1), nn.ReLU(), nn.Conv2d(10, 10, 3, padding=1))
        self.cv2 = nn.Conv2d(30, 4, 1)

    def forward(self, x):
        a, b = self.cv1(x).chunk(2, 1)
        return self.cv2(torch.cat([a, b, b + self.m(b)], 1))


class Entangled(nn.Module):
    """A chunk no drop keeps equal but by moving two cells independently: piece 0 holds ``a`` once and
    ``b`` twice, piece 1 holds ``c`` (``d_a + 2 d_b = d_c`` has a plane of solutions): its units freeze,
    with the reason, and the rest prunes."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 2, 1), nn.Conv2d(3, 2, 1), nn.Conv2d(3, 6, 1)
        self.h1, self.h2 = nn.Conv2d(6, 8, 1), nn.Conv2d(6, 8, 1)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        b = self.b(x)
        left, right = torch.cat([self.a(x), b, b, self.c(x)], 1).chunk(2, dim=1)
        return self.head(F.relu(self.h1(left) + self.h2(right)))


CHUNK_CASES = {"chunked": (Chunked, (1, 3, 4, 4)), "shuffle": (Shuffle, (1, 3, 4, 4)),
               "cat_chunked": (CatChunked, (1, 3, 4, 4)), "c2f": (C2fLike, (1, 3, 6, 6)),
               "entangled": (Entangled, (1, 3, 4, 4))}


@pytest.mark.parametrize("case", sorted(CHUNK_CASES))
def test_chunk_pieces_stay_equal_at_30_percent(prune_checked, case, level):
    """30% of a chunked dim leaves unequal halves unless selection keeps them in lockstep: every chunk
    must still be a chunk of equal pieces (kept as ``chunk`` in the graph), and verify passes."""
    factory, shape = CHUNK_CASES[case]
    torch.manual_seed(0)
    report = prune_checked(factory().eval(), torch.randn(shape), level, sparsity=0.3)
    gm = report.result.graph_module
    assert not any(str(n.target) in ("split", "aten.split_with_sizes.default") for n in gm.graph.nodes)
    chunks = [n for n in gm.graph.nodes if "chunk" in str(n.target)]
    assert chunks
    for node in chunks:
        pieces = [int(v.shape[1]) for v in (node.meta.get("val") or node.meta["tensor_meta"])]
        assert len(set(pieces)) == 1, (node.name, pieces)


def test_each_piece_drops_its_own_lowest_channels(level):
    """In lockstep each half loses the same number of channels, each its own lowest-scoring ones."""
    torch.manual_seed(0)
    model = Chunked().eval()
    with torch.no_grad():  # the consumers' columns alike: a channel's score is its conv row's
        model.conv.bias.zero_()
        model.h1.weight.fill_(1.0), model.h2.weight.fill_(1.0)
        model.conv.weight.copy_(torch.randn(12, 1, 1, 1).expand(12, 3, 1, 1))
    result = fxprune.prune(model, torch.randn(1, 3, 4, 4), 0.3, capture=level)
    kept = result.plan.kept_indices["conv.weight"][0]
    left, right = [k for k in kept if k < 6], [k - 6 for k in kept if k >= 6]
    assert len(left) == len(right) == 5  # 30% of 12 is 3.6 drops: the nearest whole step is 2 (one a half)
    norms = model.conv.weight.detach().flatten(1).abs().sum(1)
    for half, offset in ((left, 0), (right, 6)):
        dropped = set(range(6)) - set(half)
        assert all(norms[offset + d] <= norms[offset + k] for d in dropped for k in half)


def test_cat_then_chunk_ties_the_groups(level):
    torch.manual_seed(0)
    result = fxprune.prune(CatChunked().eval(), torch.randn(1, 3, 4, 4), 0.3, capture=level)
    assert [g.name for g in result.analysis.groups if g.prunable] == ["a"]  # a and b: one selection
    kept = result.plan.kept_indices
    assert len(kept["a.weight"][0]) == len(kept["b.weight"][0])


def test_a_chunk_no_drop_keeps_equal_freezes_with_the_reason(level):
    torch.manual_seed(0)
    result = fxprune.prune(Entangled().eval(), torch.randn(1, 3, 4, 4), 0.5, capture=level)
    frozen = {g.name: g.reasons for g in result.analysis.groups if not g.prunable}
    assert {"a", "b", "c"} <= set(frozen)
    assert all("pieces of a chunk must keep equal sizes" in frozen[n][0] for n in ("a", "b", "c"))
    assert len(result.plan.kept_indices["h1.weight"][0]) == 4  # the rest still prunes


@pytest.mark.parametrize("options", [{"round_to": 4}, {"global_ranking": True}, {"min_keep": 4},
                                     {"sparsity": {"cv1": 0.3}}])
def test_lockstep_with_selection_options(level, options):
    """round_to, global ranking, min_keep and per-module ratios all keep the halves equal and verify."""
    torch.manual_seed(0)
    options = {"sparsity": 0.3, **options}
    report = check_pruned_quiet(C2fLike().eval(), torch.randn(1, 3, 6, 6), level, options)
    kept = report.result.plan.kept_indices["cv1.weight"][0]
    halves = [k for k in kept if k < 10], [k for k in kept if k >= 10]
    assert len(halves[0]) == len(halves[1]) >= options.get("min_keep", 1)
    if "round_to" in options:
        assert len(kept) % 4 == 0


def check_pruned_quiet(model, x, level, options):
    from fxprune.testing.check import check_pruned
    return check_pruned(model, (x,), capture=level, **options)
