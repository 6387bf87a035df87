"""Smoke tests of the peer-library adapters in benchmarks/peers.py (Torch-Pruning, torch.ao)."""
from __future__ import annotations

import pathlib
import sys

import pytest
import torch
from torch import nn

sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "benchmarks"))
import peers  # noqa: E402

from fxprune.measure import count_params  # noqa: E402


def _conv_chain() -> nn.Sequential:
    # Unpadded convs: torch.ao only shrinks conv->conv when the second conv has no padding
    # (or the first has no bias), and crashes on a bias-free conv before pool->flatten->linear.
    return nn.Sequential(
        nn.Conv2d(3, 16, 3), nn.ReLU(),
        nn.Conv2d(16, 32, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 32, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10),
    ).eval()


def test_classifier_of() -> None:
    m = _conv_chain()
    assert peers.classifier_of(m) is m[10]
    assert peers.classifier_of(m, (torch.randn(1, 3, 16, 16),)) is m[10]
    with pytest.raises(ValueError):
        peers.classifier_of(nn.Conv2d(3, 3, 1))


def test_torch_ao_prunes_a_conv_chain_without_mutating_it() -> None:
    torch.manual_seed(0)
    model = _conv_chain()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = (torch.randn(2, 3, 24, 24),)
    pruned = peers.prune_with_torch_ao(model, x, 0.5)
    assert count_params(pruned) < count_params(model)
    assert pruned(*x).shape == (2, 10)
    convs = [m for m in pruned.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [8, 16, 16]
    assert pruned.get_submodule("10").out_features == 10  # classifier kept
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_torch_ao_rejects_a_residual_instead_of_breaking_it() -> None:
    class Res(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1, self.c2, self.c3 = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            a = self.c1(x)
            return self.c3(nn.functional.relu(self.c2(nn.functional.relu(a))) + a)

    m = Res().eval()
    with pytest.raises(peers.PeerUnsupported, match="users"):
        peers.prune_with_torch_ao(m, (torch.randn(1, 3, 5, 5),), 0.5, ignored_layers=[m.c3])


def test_torch_ao_rejects_resnet18() -> None:
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet18().eval()
    with pytest.raises(peers.PeerUnsupported, match="BatchNorm2d"):
        peers.prune_with_torch_ao(model, (torch.randn(1, 3, 64, 64),), 0.5)


def test_torch_pruning_resnet18() -> None:
    pytest.importorskip("torch_pruning")
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet18()  # training mode on purpose: TP's tracer sets eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = (torch.randn(1, 3, 64, 64),)
    pruned = peers.prune_with_torch_pruning(model, x, 0.5)
    assert count_params(pruned) < 0.3 * count_params(model)
    assert pruned.fc.out_features == 1000 and pruned.fc.in_features == 256
    assert pruned.training and model.training  # modes restored / untouched
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert pruned.eval()(*x).shape == (1, 1000)


def test_torch_pruning_frozen_params_keep_their_flags() -> None:
    pytest.importorskip("torch_pruning")
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    model[0].weight.requires_grad_(False)
    pruned = peers.prune_with_torch_pruning(model, (torch.randn(2, 8),), 0.5)
    assert pruned[0].out_features == 8
    assert not pruned[0].weight.requires_grad and pruned[0].bias.requires_grad


@pytest.mark.slow
def test_torch_pruning_vit_b_16_needs_and_gets_the_hidden_dim_fix() -> None:
    pytest.importorskip("torch_pruning")
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.vit_b_16().eval()
    x = (torch.randn(1, 3, 224, 224),)
    pruned = peers.prune_with_torch_pruning(model, x, 0.3)
    assert pruned.hidden_dim == pruned.conv_proj.out_channels < 768
    assert pruned.hidden_dim % pruned.encoder.layers[0].num_heads == 0
    with torch.no_grad():
        assert pruned(*x).shape == (1, 1000)


def test_bad_ratio() -> None:
    with pytest.raises(ValueError):
        peers.prune_with_torch_ao(_conv_chain(), (torch.randn(1, 3, 16, 16),), 1.0)
