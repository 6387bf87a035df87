"""Promise 1, buffers included: running the user's model (capture, calibration, verify) never changes it.

Two models whose forward writes state: one that counts its calls in a buffer (``self.calls.add_(1)``),
and a QAT-prepared model (``prepare_qat_fx``) whose observers update scale, zero point and min/max on
every forward -- and assign new tensors for some of them. Every buffer (persistent or not) and every
tensor object a module holds is compared before and after each API call, at both graph levels.
"""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import fxprune

X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
BATCHES = [(X,), (3 * X,)]


class Counting(nn.Module):
    """A forward that updates a buffer in place, persistent and not."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 3, padding=1)
        self.register_buffer("calls", torch.zeros(()))
        self.register_buffer("seen", torch.zeros(()), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.add_(1)
        self.seen.add_(x.shape[0])
        return self.conv2(torch.relu(self.conv1(x)))


def counting() -> nn.Module:
    torch.manual_seed(0)
    return Counting().eval()


def qat_prepared() -> nn.Module:
    """A QAT-prepared model that has seen data (its observers hold ranges), in eval mode."""
    from torch.ao.quantization import get_default_qat_qconfig_mapping
    from torch.ao.quantization.quantize_fx import prepare_qat_fx
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1)).train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = prepare_qat_fx(model, get_default_qat_qconfig_mapping(), (X,))
    prepared(X)
    return prepared.eval()


def state(model: nn.Module) -> dict:
    """Every tensor the model holds, by name, with the object's identity."""
    tensors = dict(model.named_parameters(remove_duplicate=False))
    tensors.update(dict(model.named_buffers(remove_duplicate=False)))
    return {k: (id(v), v.detach().clone()) for k, v in tensors.items()}


def assert_same(before: dict, model: nn.Module) -> None:
    after = state(model)
    assert after.keys() == before.keys()
    changed = [k for k in before if before[k][0] != after[k][0] or not torch.equal(before[k][1], after[k][1])]
    assert not changed, f"the user's model changed: {changed}"


CALLS = {
    "prune": lambda m, level: fxprune.prune(m, (X,), 0.5, capture=level),
    "calibration": lambda m, level: fxprune.prune(m, (X,), 0.5, capture=level, criterion="activation",
                                                  calibration=BATCHES),
    "verify": lambda m, level: fxprune.verify(m, fxprune.prune(m, (X,), 0.5, capture=level), (X,)),
    "analyze": lambda m, level: fxprune.analyze(m, (X,), level),
}


@pytest.mark.parametrize("call", CALLS.values(), ids=CALLS.keys())
@pytest.mark.parametrize("level", ["fx", "export"])
def test_a_buffer_mutating_forward_is_not_run_on_the_users_model(call, level) -> None:
    model = counting()
    before = state(model)
    call(model, level)
    assert_same(before, model)


@pytest.mark.parametrize("call", CALLS.values(), ids=CALLS.keys())
def test_qat_observers_are_untouched(call) -> None:
    model = qat_prepared()
    before = state(model)
    call(model, "fx")
    assert_same(before, model)


def test_apply_plan_and_the_result_leave_the_model_untouched() -> None:
    model = counting()
    result = fxprune.prune(model, (X,), 0.5, capture="export", criterion="activation", calibration=BATCHES)
    before = state(model)
    fxprune.apply_plan(model, result.plan, (X,))
    result.graph_module(X)  # the pruned model shares no mutable tensor with the user's
    assert_same(before, model)
