"""DESIGN.md's promises, each as a test on a small residual network and on torchvision's resnet18."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torchvision

import fxprune
from fxprune.core.capture import capture

X = torch.randn(2, 3, 32, 32)


def _resnet() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10).eval()


def _state(module: nn.Module) -> dict:
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_input_graph_module_is_untouched(level):
    """A GraphModule is used as it is: its code, metadata, tensors and mode are left alone."""
    gm = capture(_resnet(), X, level).gm
    code, state = gm.code, _state(gm)
    meta = {n.name: dict(n.meta) for n in gm.graph.nodes}
    result = fxprune.prune(gm, X, 0.5)
    assert result.level == level and result.graph_module is not gm
    assert gm.code == code and all(torch.equal(state[k], v) for k, v in gm.state_dict().items())
    assert {n.name: dict(n.meta) for n in gm.graph.nodes}.keys() == meta.keys()
    assert all(n.meta.get("val") is meta[n.name].get("val") for n in gm.graph.nodes)


def test_exported_program_input_gives_an_export_level_result():
    ep = torch.export.export(_resnet(), (X,))
    state = {k: v.clone() for k, v in ep.state_dict.items()}
    result = fxprune.prune(ep, X, 0.5)
    assert result.level == "export"
    assert all(torch.equal(state[k], v) for k, v in ep.state_dict.items())
    assert fxprune.verify(ep.module(), result).passed


def test_output_shares_no_storage_with_input(level):
    model = _resnet()
    result = fxprune.prune(model, X, 0.5, capture=level)
    inputs = {t.untyped_storage().data_ptr() for t in model.state_dict().values()}
    outputs = {t.untyped_storage().data_ptr() for t in result.graph_module.state_dict().values()}
    assert not inputs & outputs


def test_rerun_is_byte_identical(level):
    a = fxprune.prune(_resnet(), X, 0.5, capture=level)
    b = fxprune.prune(_resnet(), X, 0.5, capture=level)
    assert a.graph_module.code == b.graph_module.code
    assert a.plan.to_json() == b.plan.to_json()
    sa, sb = a.graph_module.state_dict(), b.graph_module.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("source, target", [("fx", "export"), ("export", "fx")])
def test_plan_from_one_level_applies_at_the_other(source, target):
    """Plans are keyed by state_dict names, so they do not depend on the graph level."""
    model = _resnet()
    made = fxprune.prune(model, X, 0.5, capture=source)
    plan = fxprune.Plan.from_json(made.plan.to_json())
    applied = fxprune.apply_plan(copy.deepcopy(model), plan, X, capture=target)
    assert applied.level == target
    with torch.no_grad():
        torch.testing.assert_close(applied.graph_module(X), made.graph_module(X), rtol=1e-4, atol=1e-5)


def test_names_modes_and_grads_are_preserved(level):
    model = _resnet()
    model.fc.weight.requires_grad_(False)
    result = fxprune.prune(model, X, 0.5, capture=level)
    assert set(result.graph_module.state_dict()) == set(model.state_dict())
    assert not result.graph_module.get_parameter("fc.weight").requires_grad
    assert result.graph_module.get_parameter("conv1.weight").requires_grad
    assert not result.graph_module.training


def test_result_can_be_pruned_again(level):
    first = fxprune.prune(_resnet(), X, 0.5, capture=level)
    second = fxprune.testing.check.check_pruned(first.graph_module, X, sparsity=0.5)
    assert second.result.level == level and second.params_after < second.params_before


def test_no_hand_patch_needed_after_pruning():
    """Sizes live in the graph or in rewritten modules, never in attributes a user must fix."""
    result = fxprune.prune(_resnet(), X, 0.5)
    gm = result.graph_module
    for name, module in gm.named_modules():
        if isinstance(module, nn.Conv2d):
            assert module.out_channels == module.weight.shape[0], name
            assert module.in_channels == module.weight.shape[1] * module.groups, name
        if isinstance(module, nn.BatchNorm2d):
            assert module.num_features == module.weight.shape[0], name
    with torch.no_grad():
        assert gm(torch.randn(1, 3, 64, 64)).shape == (1, 10)
