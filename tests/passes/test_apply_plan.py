"""apply-plan: a saved plan re-applied to a captured graph gives the pruned model it came from."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from torch.fx.passes.infra.pass_manager import PassManager

import fxprune
from fxprune.core.capture import capture
from fxprune.errors import InvalidOptionError, PipelineError, PlanMismatchError
from fxprune.passes import ApplyPlan
from fxprune.passes.pipeline import Pipeline

X = torch.randn(2, 3, 8, 8)


class Net(nn.Module):
    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.conv1, self.bn = nn.Conv2d(3, width, 3), nn.BatchNorm2d(width)
        self.conv2, self.fc = nn.Conv2d(width, 8, 3), nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv2(torch.relu(self.bn(self.conv1(x)))))
        return self.fc(y.mean((2, 3)))


def _same_state(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_plan_json(level: str, run_pure, graph_snapshot) -> None:
    model = Net().eval()
    pruned = fxprune.prune(model, (X,), sparsity=0.5, capture=level)
    gm = capture(model, (X,), level).gm
    result = run_pure(ApplyPlan(pruned.plan.to_json()), gm)
    assert result.graph_module == graph_snapshot
    assert result.modified
    assert result.graph_module.code == pruned.graph_module.code
    assert _same_state(result.graph_module, pruned.graph_module)
    assert result.graph_module.state_dict()["conv1.weight"].shape == (4, 3, 3, 3)
    with torch.no_grad():
        torch.testing.assert_close(result.graph_module(X), pruned.graph_module(X))


def test_an_fx_plan_applies_at_export_level(run_pure) -> None:
    model = Net().eval()
    plan = fxprune.prune(model, (X,), sparsity=0.5).plan
    result = run_pure(ApplyPlan.of(plan), capture(model, (X,), "export").gm)
    assert result.graph_module.state_dict()["conv2.weight"].shape == (4, 4, 3, 3)


def test_an_empty_plan_changes_nothing(run_pure) -> None:
    model = Net().eval()
    plan = fxprune.prune(model, (X,), sparsity=0.0).plan
    result = run_pure(ApplyPlan.of(plan), capture(model, (X,)).gm)
    assert not result.modified


def test_the_pass_holds_the_plan() -> None:
    plan = fxprune.prune(Net().eval(), (X,), sparsity=0.5).plan
    p = ApplyPlan.of(plan)
    assert p.plan == plan and p == ApplyPlan(plan.to_json(indent=None)) and hash(p)


@pytest.mark.parametrize("text", ["", "{", '{"format": "other"}', "[1, 2]"])
def test_a_malformed_plan_is_refused_when_built(text: str) -> None:
    with pytest.raises(InvalidOptionError, match="plan_json is not a plan"):
        ApplyPlan(text)


def test_a_plan_for_another_model_is_refused_when_run() -> None:
    plan = fxprune.prune(Net().eval(), (X,), sparsity=0.5).plan
    other = capture(Net(width=6).eval(), (X,)).gm
    with pytest.raises(PlanMismatchError, match=r"plan expects .* of shape \[8\], the model has \[6\]"):
        ApplyPlan.of(plan)(other)
    with pytest.raises(PipelineError, match=r"pass 'apply-plan\{plan_json=.*\}' \(#1 of 1\) failed"):
        Pipeline((ApplyPlan.of(plan),))(other)


def test_in_a_pass_manager() -> None:
    model = Net().eval()
    pruned = fxprune.prune(model, (X,), sparsity=0.5)
    result = PassManager(passes=[ApplyPlan.of(pruned.plan)])(capture(model, (X,)).gm)
    assert result.modified and _same_state(result.graph_module, pruned.graph_module)
