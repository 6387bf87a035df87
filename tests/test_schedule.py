"""Schedules: torch.ao's CubicSL curve, linear and constant ramps; iterative and gradual pruning."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from torch.ao.pruning.scheduler.cubic_scheduler import CubicSL

import fxprune
from fxprune.passes import schedule
from fxprune.core.capture import capture
from fxprune.testing.check import check_pruned
from fxprune.errors import InvalidOptionError
from fxprune.passes import MaskChannels, Materialize
from fxprune.passes.mask_channels import masked_plan
from fxprune.measure import count_params

X = torch.randn(2, 3, 8, 8)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.conv2, self.bn2 = nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return self.fc(torch.relu(self.bn2(self.conv2(y))).mean((2, 3)))


def _fine_tune(gm: torch.fx.GraphModule, steps: int = 2) -> None:
    gm.train()
    opt = torch.optim.SGD(gm.parameters(), lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        gm(torch.randn(2, 3, 8, 8)).square().mean().backward()
        opt.step()
    gm.eval()


@pytest.mark.parametrize("initial, final, total, warmup", [(0.0, 0.5, 10, 0), (0.1, 0.9, 7, 3), (0.3, 0.3, 4, 2)])
def test_cubic_is_torch_ao_cubic_sl(initial: float, final: float, total: int, warmup: int) -> None:
    s = schedule.cubic(initial, final, total_steps=total, warmup=warmup)
    expected = [CubicSL.sparsity_compute_fn(initial, final, t, warmup, 1, total) for t in range(len(s))]
    assert list(s) == pytest.approx(expected)
    assert len(s) == warmup + total + 1 and s(-5) == initial and s(10**6) == final


def test_cubic_prunes_fast_then_slowly() -> None:
    values = list(schedule.cubic(0.0, 0.8, total_steps=8))
    steps = [b - a for a, b in zip(values, values[1:])]
    assert values[0] == 0.0 and values[-1] == 0.8
    assert all(x > y > 0 for x, y in zip(steps, steps[1:]))


def test_linear_and_constant() -> None:
    assert list(schedule.linear(0.2, 0.6, total_steps=4, warmup=1)) == pytest.approx([0.2, 0.2, 0.3, 0.4, 0.5, 0.6])
    assert list(schedule.constant(0.4, total_steps=3)) == [0.4] * 4


def test_changes_are_the_steps_to_prune_at() -> None:
    s = schedule.linear(0.0, 0.5, total_steps=2, warmup=2)
    assert list(s) == [0.0, 0.0, 0.0, 0.25, 0.5] and s.changes() == (0, 3, 4)
    assert schedule.constant(0.5, total_steps=3).changes() == (0,)


def test_schedules_are_frozen_values() -> None:
    assert schedule.cubic(0.0, 0.5, 10) == schedule.Schedule("cubic", 0.0, 0.5, 10)
    assert hash(schedule.linear(0.0, 0.5, 10)) == hash(schedule.linear(0.0, 0.5, 10))


@pytest.mark.parametrize("bad", [dict(initial=1.0), dict(final=-0.1), dict(total_steps=0), dict(warmup=-1),
                                 dict(total_steps=2.5), dict(shape="exp")])
def test_bad_schedules_are_refused(bad: dict) -> None:
    args = dict(shape="cubic", initial=0.0, final=0.5, total_steps=10, warmup=0) | bad
    with pytest.raises(InvalidOptionError):
        schedule.Schedule(**args)


def test_step_ratio() -> None:
    assert schedule.step_ratio(0.0, 0.5) == 0.5 and schedule.step_ratio(0.5, 0.75) == 0.5
    with pytest.raises(InvalidOptionError):
        schedule.step_ratio(0.5, 0.25)


def test_iterative_pruning_prunes_its_own_output(level: str) -> None:
    """prune -> fine-tune -> prune again: each round's input is the previous GraphModule."""
    targets = list(schedule.linear(0.0, 0.75, total_steps=2))[1:]  # 0.375, then 0.75 in total
    gm = capture(Net().eval(), (X,), level).gm
    sizes, before = [count_params(gm)], 0.0
    for target in targets:
        report = check_pruned(gm, (X,), capture=level, sparsity=schedule.step_ratio(before, target))
        gm, before = report.result.graph_module, target
        sizes.append(count_params(gm))
        if level == "fx":
            _fine_tune(gm)
    assert sizes[0] > sizes[1] > sizes[2]
    assert [t.shape[0] for t in (gm.state_dict()["conv1.weight"], gm.state_dict()["conv2.weight"])] == [4, 4]


def test_gradual_soft_pruning_with_a_schedule() -> None:
    s = schedule.cubic(0.0, 0.5, total_steps=3, warmup=1)
    gm = capture(Net().eval(), (X,)).gm
    kept: list[set] = []
    for step, sparsity in enumerate(s):
        if step in s.changes() and sparsity > 0:
            gm = MaskChannels(sparsity=sparsity)(gm).graph_module
            kept.append(set(masked_plan(gm).kept_indices["conv1.weight"][0]))
        _fine_tune(gm, steps=1)
    assert all(b < a for a, b in zip(kept, kept[1:])) and len(kept[-1]) == 8
    small = Materialize()(gm).graph_module
    assert small.conv1.out_channels == small.conv2.out_channels == 8
    with torch.no_grad():
        torch.testing.assert_close(small(X), gm(X), rtol=1e-5, atol=1e-5)
