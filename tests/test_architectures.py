"""Architectures a new user brings, pruned at 50% at both levels: each keeps its output shape, shrinks,
leaves its input untouched and (no channel-mixing norm involved) equals the zeroed-channel reference.
Building blocks that have their own rule tests (UNet skip concat, shuffle, inception, DenseNet growth,
inverted residuals, flatten-into-MLP, Conv1d+PReLU, Conv3d, loose parameters, embedding bags, LSTM/GRU,
attention) are composed here into whole networks."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fxprune.testing.check import check_pruned



class SE(nn.Module):
    def __init__(self, c: int, r: int = 4):
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(c, c // r, 1), nn.Conv2d(c // r, c, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(x, 1)))))


class SEResNeXtBlock(nn.Module):
    def __init__(self, c: int = 16, width: int = 32, groups: int = 8):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, c, 1, bias=False), nn.BatchNorm2d(c)
        self.se = SE(c)

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        return F.relu(x + self.se(self.bn3(self.conv3(y))))


class SEResNeXt(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.blocks = nn.Sequential(SEResNeXtBlock(), SEResNeXtBlock())
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1), 1))


class UNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.e1 = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.e2 = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.mid = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.ReLU())
        self.up2 = nn.ConvTranspose2d(32, 16, 2, stride=2)
        self.d2 = nn.Sequential(nn.Conv2d(32, 16, 3, padding=1), nn.ReLU())
        self.up1 = nn.ConvTranspose2d(16, 8, 2, stride=2)
        self.d1 = nn.Sequential(nn.Conv2d(16, 8, 3, padding=1), nn.ReLU())
        self.out = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        s1 = self.e1(x)
        s2 = self.e2(F.max_pool2d(s1, 2))
        m = self.mid(F.max_pool2d(s2, 2))
        y = self.d2(torch.cat([s2, self.up2(m)], 1))
        y = self.d1(torch.cat([s1, self.up1(y)], 1))
        return self.out(y)


class TCN(nn.Module):
    """Dilated Conv1d residual stack with PReLU, then a GRU head."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Conv1d(4, 16, 1)
        self.convs = nn.ModuleList(nn.Conv1d(16, 16, 3, padding=d, dilation=d) for d in (1, 2, 4))
        self.acts = nn.ModuleList(nn.PReLU(16) for _ in range(3))
        self.gru = nn.GRU(16, 12, batch_first=True)
        self.head = nn.Linear(12, 3)

    def forward(self, x):
        y = self.inp(x)
        for conv, act in zip(self.convs, self.acts):
            y = y + act(conv(y))
        out, _ = self.gru(y.transpose(1, 2))
        return self.head(out[:, -1])


class WideDeep(nn.Module):
    """An embedding bag and dense features concatenated into an MLP."""

    def __init__(self):
        super().__init__()
        self.bag = nn.EmbeddingBag(50, 16, mode="mean")
        self.dense = nn.Linear(6, 16)
        self.mlp = nn.Sequential(nn.Linear(32, 24), nn.ReLU(), nn.Dropout(0.1), nn.Linear(24, 1))

    def forward(self, ids, feats):
        return self.mlp(torch.cat([self.bag(ids), F.relu(self.dense(feats))], dim=1))


class Video(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Sequential(nn.Conv3d(3, 8, 3, padding=1), nn.BatchNorm3d(8), nn.ReLU())
        self.c2 = nn.Sequential(nn.Conv3d(8, 8, 3, padding=1, groups=8), nn.Conv3d(8, 16, 1), nn.ReLU())
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        return self.fc(F.adaptive_avg_pool3d(self.c2(self.c1(x)), 1).flatten(1))


class TwoHeads(nn.Module):
    """A dict output (as torchvision's segmentation models return): every entry is a fixed interface."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.out, self.aux = nn.Conv2d(16, 5, 1), nn.Conv2d(16, 2, 1)

    def forward(self, x):
        y = self.body(x)
        return {"out": F.interpolate(self.out(y), size=x.shape[-2:]), "aux": self.aux(y)}


CASES = {
    "two_heads": (TwoHeads, lambda: (torch.randn(1, 3, 8, 8),)),
    "se_resnext": (SEResNeXt, lambda: (torch.randn(2, 3, 8, 8),)),
    "unet": (UNet, lambda: (torch.randn(1, 3, 16, 16),)),
    "tcn_gru": (TCN, lambda: (torch.randn(2, 4, 20),)),
    "wide_deep": (WideDeep, lambda: (torch.randint(0, 50, (4, 3)), torch.randn(4, 6))),
    "video": (Video, lambda: (torch.randn(1, 3, 4, 8, 8),)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_architecture(case, level):
    factory, inputs = CASES[case]
    torch.manual_seed(0)
    model = factory().eval()
    report = check_pruned(model, inputs(), capture=level, sparsity=0.5)
    assert report.verify.exact and report.params_after < 0.75 * report.params_before


TORCHVISION_BEYOND_CLASSIFICATION = {
    # returns {"out": ...}: the channels reaching it stay (the fx level once pruned them: 5 -> 3 classes)
    "lraspp_mobilenet_v3_large": (dict(weights_backbone=None), (1, 3, 64, 64), True),
    "r3d_18": ({}, (1, 3, 4, 32, 32), True),
    # 3-D window attention: a wrapped function at the fx level; LayerNorm on the residual stream
    "swin3d_t": ({}, (1, 3, 4, 64, 64), False),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(TORCHVISION_BEYOND_CLASSIFICATION))
def test_torchvision_beyond_classification(name, level):
    import torchvision

    kwargs, shape, exact = TORCHVISION_BEYOND_CLASSIFICATION[name]
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, num_classes=5, **kwargs).eval()
    report = check_pruned(model, torch.randn(shape), capture=level, sparsity=0.5, deterministic=False)
    assert report.verify.exact is exact and report.params_after < 0.5 * report.params_before


@pytest.mark.slow
def test_torchvision_quantizable_resnet(level):
    # QuantStub / DeQuantStub and FloatFunctional's add: the float model before prepare prunes as is
    from torchvision.models.quantization import resnet18

    torch.manual_seed(0)
    report = check_pruned(resnet18(weights=None, quantize=False).eval(), torch.randn(1, 3, 64, 64),
                          capture=level, sparsity=0.5, deterministic=False)
    assert report.verify.exact and report.params_after < 0.5 * report.params_before
