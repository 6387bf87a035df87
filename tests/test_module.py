"""fxprune.module: the user's own class back, sliced per the plan, checked against the pruned graph."""
from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
import torchvision
from torch import nn

import fxprune
import fxprune.module
from fxprune.errors import ModuleForwardError, PlanMismatchError


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _state(model: nn.Module) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


class Baked(nn.Module):
    """A forward that bakes a width into code: ``view(-1, 16 * 4 * 4)``."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.fc = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x):
        return self.fc(self.pool(self.conv(x).relu()).view(-1, 16 * 4 * 4))


class Sizes(nn.Module):
    """Every resized layer kind: conv, BatchNorm, GroupNorm, LayerNorm, dropout, embedding-free MHA,
    LSTM and a PReLU, with a user attention that keeps ``self.num_heads``."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 32, 3, padding=1)
        self.bn = nn.BatchNorm2d(32)
        self.gn = nn.GroupNorm(4, 32)
        self.act = nn.PReLU(32)
        self.drop = nn.Dropout(0.1)
        self.proj = nn.Linear(32, 48)
        self.mha = nn.MultiheadAttention(48, 4, batch_first=True)
        self.ln = nn.LayerNorm(48)
        self.attn = UserAttention(48, 4)
        self.lstm = nn.LSTM(48, 24, batch_first=True)
        self.head = nn.Linear(24, 5)

    def forward(self, x):
        x = self.drop(self.act(self.gn(self.bn(self.conv(x)))))
        x = self.proj(x.flatten(2).transpose(1, 2))
        x = self.ln(x + self.mha(x, x, x, need_weights=False)[0])
        x = self.attn(x)
        return self.head(self.lstm(x)[0])


class UserAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scale = self.head_dim ** -0.5  # the graph keeps the original scale when a head narrows
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return x + self.out(y.transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim))


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_resnet18_comes_back_as_resnet(capture):
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    before = _state(model)
    out = fxprune.module.prune(model, (x,), sparsity=0.5, capture=capture)
    assert type(out.module) is torchvision.models.ResNet
    assert _params(out.module) < 0.3 * _params(model)
    assert out.module.layer1[0].conv1.out_channels == out.module.layer1[0].conv1.weight.shape[0] == 32
    assert out.module.layer1[0].bn1.num_features == 32
    torch.testing.assert_close(out.module(x), out.result.graph_module(x), rtol=1e-4, atol=1e-4)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the model is unchanged


def test_every_layer_kind_is_resized_and_the_copy_trains():
    torch.manual_seed(0)
    model = Sizes()
    model.eval()
    x = torch.randn(2, 3, 8, 8)
    out = fxprune.module.prune(model, (x,), sparsity=0.5)
    small = out.module
    assert (small.conv.out_channels, small.bn.num_features, small.gn.num_channels) == (16, 16, 16)
    assert small.gn.num_groups == 2 and small.act.num_parameters == 16
    assert small.lstm.hidden_size == small.lstm.weight_hh_l0.shape[1] < 24
    assert small.mha.num_heads * small.mha.head_dim == small.mha.embed_dim == small.proj.out_features
    assert 3 * small.attn.num_heads * small.attn.head_dim == small.attn.qkv.out_features < 3 * 48
    assert small.ln.normalized_shape == (small.proj.out_features,)
    # a second batch size was checked; BatchNorm and dropout in train mode; one optimizer step
    torch.testing.assert_close(small(torch.cat([x, x])), out.result.graph_module(torch.cat([x, x])))
    small.train()
    mean = small.bn.running_mean.clone()
    optimizer = torch.optim.SGD(small.parameters(), lr=0.1)
    small(x).square().mean().backward()
    optimizer.step()
    assert not torch.equal(small.bn.running_mean, mean)
    assert all(p.grad is not None for p in small.parameters())


def test_the_copy_pickles_as_its_class():
    model = torchvision.models.mobilenet_v3_small(num_classes=10).eval()
    x = torch.randn(1, 3, 64, 64)
    small = fxprune.module.prune(model, (x,), sparsity=0.5).module
    buffer = io.BytesIO()
    torch.save(small, buffer)
    buffer.seek(0)
    again = torch.load(buffer, weights_only=False)  # the user's own pickle, as before pruning
    assert type(again) is type(model)
    torch.testing.assert_close(again(x), small(x))
    assert type(pickle.loads(pickle.dumps(small))) is type(model)


def test_requires_grad_false_still_prunes_and_is_kept():
    model = torchvision.models.resnet18(num_classes=10).eval().requires_grad_(False)
    out = fxprune.module.prune(model, (torch.randn(1, 3, 32, 32),), sparsity=0.5)
    assert _params(out.module) < 0.3 * _params(model)
    assert not any(p.requires_grad for p in out.module.parameters())


def test_a_baked_size_is_refused_naming_the_module():
    model = Baked().eval()
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(ModuleForwardError, match=r"'fc' \(Linear\).*result.graph_module"):
        fxprune.module.prune(model, (x,), sparsity=0.5)
    result = fxprune.prune(model, (x,), sparsity=0.5)  # the graph result has the literal rewritten
    assert result.graph_module(x).shape == (2, 10)


def test_a_plan_for_another_model_is_refused():
    x = torch.randn(1, 3, 32, 32)
    result = fxprune.prune(torchvision.models.resnet18().eval(), (x,), sparsity=0.5)
    with pytest.raises(PlanMismatchError, match="another model"):
        fxprune.module.rebuild(torchvision.models.resnet50().eval(), result)


def test_tied_weights_stay_tied():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(20, 16)
            self.mid = nn.Linear(16, 32)
            self.back = nn.Linear(32, 16)
            self.out = nn.Linear(16, 20, bias=False)
            self.out.weight = self.embed.weight

        def forward(self, ids):
            h = self.embed(ids)
            return self.out(h + self.back(self.mid(h).relu()))

    model = Tied().eval()
    small = fxprune.module.prune(model, (torch.randint(0, 20, (2, 5)),), sparsity=0.5).module
    assert small.out.weight is small.embed.weight
    assert small.mid.out_features == 16


def test_saved_files_rebuild_a_fresh_model(tmp_path):
    torch.manual_seed(0)
    model = Sizes().eval()
    x = torch.randn(2, 3, 8, 8)
    out = fxprune.module.prune(model, (x,), sparsity=0.5)
    fxprune.module.save(out, tmp_path, model)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors", "plan.json", "sizes.json"]
    torch.manual_seed(1)
    again = fxprune.module.load(tmp_path, Sizes().eval())  # another initialisation: every tensor is loaded
    assert type(again) is Sizes and again.attn.head_dim == out.module.attn.head_dim
    torch.testing.assert_close(again(x), out.module(x))


def test_prune_output_module():
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    result = fxprune.prune(model, (x,), sparsity=0.5, output="module")
    assert type(result.module) is torchvision.models.ResNet
    torch.testing.assert_close(result.module(x), result.graph_module(x), rtol=1e-4, atol=1e-4)
    assert fxprune.prune(model, (x,), sparsity=0.5).module is None
    with pytest.raises(fxprune.errors.InvalidOptionError, match="output"):
        fxprune.prune(model, (x,), output="modules")



class PSALike(nn.Module):
    """YOLO11's C2PSA in small: halves split by ``(self.c, self.c)`` (one number in the code), attention
    whose ``v`` is viewed back with ``C`` read from the input's shape, heads sized by attributes."""

    def __init__(self, c: int = 24, heads: int = 4):
        super().__init__()
        self.c, self.num_heads = c, heads
        self.head_dim, self.key_dim = c // heads, c // heads // 2
        self.cv1 = nn.Conv2d(3, 2 * c, 1)
        self.qkv = nn.Conv2d(c, c + 2 * self.key_dim * heads, 1)
        self.pe = nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.proj = nn.Conv2d(c, c, 1)
        self.cv2 = nn.Conv2d(2 * c, 4, 1)

    def attention(self, x):
        B, C, H, W = x.shape
        q, k, v = self.qkv(x).view(B, self.num_heads, self.key_dim * 2 + self.head_dim, H * W).split(
            [self.key_dim, self.key_dim, self.head_dim], dim=2)
        attn = (q.transpose(-2, -1) @ k).softmax(dim=-1)
        x = (v @ attn.transpose(-2, -1)).view(B, C, H, W) + self.pe(v.reshape(B, C, H, W))
        return self.proj(x)

    def forward(self, x):
        a, b = self.cv1(x).split((self.c, self.c), dim=1)
        b = b + self.attention(b)
        return self.cv2(torch.cat((a, b), 1))


def test_sizes_the_forward_reads_from_shapes_stay_equal_at_30_percent():
    """At 30% the graph alone may keep ``v`` wider than ``x`` and the halves unequal (its rewrite puts
    the literals in place); the user's forward recomputes those sizes, so fxprune.module keeps them
    equal (``code_sizes``) and the class comes back, checked."""
    torch.manual_seed(0)
    model = PSALike().eval()
    x = torch.randn(2, 3, 4, 4)
    out = fxprune.module.prune(model, (x,), sparsity=0.3)
    small = out.module
    assert type(small) is PSALike and out.max_abs_error < 1e-4
    kept = out.plan.kept_indices
    halves = [i for i in kept["cv1.weight"][0] if i < 24], [i for i in kept["cv1.weight"][0] if i >= 24]
    assert len(halves[0]) == len(halves[1]) == small.c < 24
    assert small.num_heads * small.head_dim == len(kept["proj.weight"][0])  # v's width is x's
    assert out.plan.options.code_sizes is True
    plain = fxprune.prune(model, (x,), sparsity=0.3)
    assert plain.plan.options.code_sizes is None  # the graph result is not tied
