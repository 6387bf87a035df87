"""Quantization rules: observers and fake-quantizers pass channels through, per-channel state follows
them, QAT layers and fused modules prune like their float layers, converted graphs are refused."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from torch.ao.quantization import (QConfig, QConfigMapping, disable_observer, get_default_qat_qconfig_mapping,
                                   get_default_qconfig_mapping)
from torch.ao.quantization.observer import MinMaxObserver, PerChannelMinMaxObserver
from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx, prepare_qat_fx

import fxprune
from fxprune.testing.check import check_pruned
from fxprune.errors import UnsupportedModelError

X = torch.randn(4, 3, 8, 8)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.relu1, self.relu2 = nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.ReLU()
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu1(self.bn1(self.conv1(x)))  # prepare_fx fuses conv-bn-relu, conv-relu
        return self.fc(self.relu2(self.conv2(y)).mean((2, 3)))


def _calibrated(prepared: torch.fx.GraphModule, batches: int = 2) -> torch.fx.GraphModule:
    with torch.no_grad():
        for _ in range(batches):
            prepared(torch.randn(4, 3, 8, 8))
    return prepared


def _ptq(qconfig_mapping: QConfigMapping = None) -> torch.fx.GraphModule:
    mapping = qconfig_mapping or get_default_qconfig_mapping("x86")
    return _calibrated(prepare_fx(Net().eval(), mapping, (X,)))


def _qat() -> torch.fx.GraphModule:
    prepared = prepare_qat_fx(Net().train(), get_default_qat_qconfig_mapping("x86"), (X,))
    return _calibrated(prepared)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _kept(result: fxprune.PruneResult, key: str) -> list[int]:
    return list(result.plan.kept_indices[key][0])


def test_per_tensor_observers_pass_channels_through() -> None:
    prepared = _ptq()
    before = _state(prepared)
    result = fxprune.prune(prepared, (X,), sparsity=0.5)
    after = prepared.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "capture ran the observers"
    assert all(g.exact for g in result.groups)
    assert fxprune.verify(prepared, result, (X,)).passed
    assert result.graph_module.conv1[0].out_channels == 4  # the fused ConvReLU2d's conv
    assert result.graph_module(X).shape == (4, 4)


def test_per_channel_observer_state_follows_the_channel() -> None:
    per_channel = QConfig(activation=PerChannelMinMaxObserver.with_args(ch_axis=1, dtype=torch.quint8),
                          weight=MinMaxObserver.with_args(dtype=torch.qint8))
    prepared = _ptq(QConfigMapping().set_global(per_channel))
    result = fxprune.prune(prepared, (X,), sparsity=0.5)
    kept = [_kept(result, "conv1.0.weight"), _kept(result, "conv2.0.weight")]
    old, new = dict(prepared.named_modules()), dict(result.graph_module.named_modules())
    observers = [n for n, m in old.items() if isinstance(m, PerChannelMinMaxObserver) and m.min_val.numel() == 8]
    assert len(observers) >= 2  # after conv1's and conv2's fused ReLU
    for name in observers:
        assert any(torch.equal(new[name].max_val, old[name].max_val[k]) and
                   torch.equal(new[name].min_val, old[name].min_val[k]) for k in kept), name
    result.graph_module(torch.randn(4, 3, 8, 8))  # observes again: state and channels agree


def test_state_not_yet_sized_is_left_to_the_observer() -> None:
    per_channel = QConfig(activation=PerChannelMinMaxObserver.with_args(ch_axis=1, dtype=torch.quint8),
                          weight=MinMaxObserver.with_args(dtype=torch.qint8))
    prepared = prepare_fx(Net().eval(), QConfigMapping().set_global(per_channel), (X,))  # not calibrated
    pruned = fxprune.prune(prepared, (X,), sparsity=0.5).graph_module
    pruned(X)
    sizes = {m.min_val.numel() for m in pruned.modules() if isinstance(m, PerChannelMinMaxObserver)}
    assert 4 in sizes and 8 not in sizes


def test_qat_layers_slice_weight_fake_quant_and_fused_batch_norm() -> None:
    prepared = _qat()
    result = fxprune.prune(prepared, (X,), sparsity=0.5)
    old, new = prepared.conv1, result.graph_module.conv1  # a ConvBnReLU2d
    kept = _kept(result, "conv1.weight")
    assert new.out_channels == new.bn.num_features == 4
    assert torch.equal(new.bn.running_var, old.bn.running_var[kept])
    for name in ("scale", "zero_point"):
        assert torch.equal(getattr(new.weight_fake_quant, name), getattr(old.weight_fake_quant, name)[kept])
    observer = new.weight_fake_quant.activation_post_process
    assert torch.equal(observer.min_val, old.weight_fake_quant.activation_post_process.min_val[kept])


def test_qat_groups_are_approximate_and_verify() -> None:
    prepared = _qat()
    prepared.apply(disable_observer)  # verify runs the model: frozen statistics keep it repeatable
    result = fxprune.prune(prepared, (X,), sparsity=0.5)
    assert not any(g.exact for g in result.groups if g.prunable)  # activation fake-quant scales mix channels
    report = fxprune.verify(prepared, result, (X,))
    assert report.passed and not report.exact


def test_pruned_qat_graph_trains_and_converts() -> None:
    prepared = _qat()
    pruned = fxprune.prune(prepared, (X,), sparsity=0.5).graph_module
    assert pruned.training
    opt = torch.optim.SGD(pruned.parameters(), lr=0.01)
    pruned(torch.randn(4, 3, 8, 8)).sum().backward()
    opt.step()
    converted = convert_fx(copy.deepcopy(pruned).eval())
    assert converted(X).shape == (4, 4)


def test_fused_modules_name_their_first_layer() -> None:
    result = fxprune.prune(_ptq(), (X,), sparsity=0.5)
    assert {"conv1.0.weight", "conv2.0.weight", "fc.weight"} <= set(result.plan.kept_indices)
    assert [g.name for g in result.groups if g.prunable] == ["conv1.0", "conv2.0"]


@pytest.mark.parametrize("stage", ["ptq", "qat"])
def test_converted_graphs_are_refused(stage: str) -> None:
    prepared = _ptq() if stage == "ptq" else _qat()
    converted = convert_fx(copy.deepcopy(prepared).eval())
    with pytest.raises(UnsupportedModelError, match="already quantized|converted"):
        fxprune.prune(converted, (X,), sparsity=0.5)


def test_check_pruned_on_a_prepared_graph_keeps_its_observers_still() -> None:
    prepared = _ptq()
    before = _state(prepared)
    check_pruned(prepared, (X,), sparsity=0.5)  # runs the input, verify and a second prune
    after = prepared.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "running the prepared graph observed"
