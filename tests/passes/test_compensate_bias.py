"""compensate-bias: dropped channels' mean contributions folded into their consumers' biases, both levels."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import fxprune
from fxprune.core.capture import capture
from fxprune.core.meta import REPORTS_KEY
from fxprune.errors import CalibrationError, InvalidOptionError, PipelineError
from fxprune.passes import CompensateBias
from fxprune.passes.pipeline import Pipeline


class Mlp(nn.Module):
    """A linear consumer with a bias and a 1x1 conv consumer without one (the pass creates it)."""

    def __init__(self) -> None:
        super().__init__()
        self.lift = nn.Conv2d(3, 8, 1)
        self.mix = nn.Conv2d(8, 6, 1, bias=False)
        self.fc1, self.fc2 = nn.Linear(6, 10), nn.Linear(10, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.mix(torch.relu(self.lift(x))).mean((2, 3))
        return self.fc2(torch.relu(self.fc1(y)))


def _loader(batches: int = 2, rows: int = 8) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    return [torch.randn(rows, 3, 4, 4, generator=gen) + 0.5 for _ in range(batches)]


def test_mean_output_of_each_consumer_is_restored(run_pure, level) -> None:
    # both consumers are linear in their input: with the dropped inputs' means added to the bias, each
    # consumer's mean output over the calibration data equals the original's exactly
    model = Mlp().eval()
    loader = _loader()
    result = fxprune.prune(model, (loader[0],), sparsity={"lift": 0.5, "fc1": 0.5}, capture=level)
    out = run_pure(CompensateBias().with_calibration(loader, source=result), result.graph_module)
    x = torch.cat(loader)
    kept = list(result.plan.kept_indices["fc1.weight"][0])
    with torch.no_grad():
        h = torch.relu(model.lift(x))
        mix_mean = model.mix(h).mean((0, 2, 3))
        pruned_h = h[:, list(result.plan.kept_indices["mix.weight"][1])]
        new = out.graph_module.state_dict()
        got = (torch.nn.functional.conv2d(pruned_h, new["mix.weight"], new["mix.bias"])).mean((0, 2, 3))
        before = torch.nn.functional.conv2d(pruned_h, new["mix.weight"]).mean((0, 2, 3))
        torch.testing.assert_close(got, mix_mean, atol=1e-5, rtol=1e-5)
        assert (before - mix_mean).abs().max() > 1e-2
        a = torch.relu(model.fc1(model.mix(h).mean((2, 3))))
        fc2_mean = model.fc2(a).mean(0)
        pruned_fc2 = a[:, kept] @ new["fc2.weight"].T + new["fc2.bias"]
        torch.testing.assert_close(pruned_fc2.mean(0), fc2_mean, atol=1e-5, rtol=1e-5)
    report = out.graph_module.meta[REPORTS_KEY][-1]
    assert [(r.layer, r.note) for r in report.layers] == [("mix", "4 dropped inputs"), ("fc2", "5 dropped inputs")]
    assert report.layers[0].before == 0.0 and report.layers[0].after > 0  # the bias it created


def test_snapshot(graph_snapshot, level) -> None:
    loader = _loader()
    gm = capture(Mlp().eval(), (loader[0],), level).gm
    result = Pipeline.parse("prune-channels{sparsity=0.5},compensate-bias")(gm, calibration=loader)
    assert result.graph_module == graph_snapshot  # mix gains a bias (fx: on the module; export: a get_attr)


def test_source_is_required_and_the_graph_is_left_alone() -> None:
    loader = _loader(batches=1)
    model = Mlp().eval()
    result = fxprune.prune(model, (loader[0],), sparsity=0.5)
    state = copy.deepcopy(result.graph_module.state_dict())
    with pytest.raises(InvalidOptionError, match="'compensate-bias' compares with the model before pruning"):
        CompensateBias().with_calibration(loader)(result.graph_module)
    gm = capture(model, (loader[0],)).gm
    with pytest.raises(PipelineError, match="carries no pruning plan"):
        Pipeline.parse("compensate-bias")(gm, calibration=loader)
    with pytest.raises(CalibrationError, match="'compensate-bias' needs calibration data"):
        Pipeline.parse("prune-channels{sparsity=0.5},compensate-bias")(gm)
    with pytest.raises(CalibrationError, match="no batches"):
        CompensateBias().with_calibration([], source=result)(result.graph_module)
    assert all(torch.equal(v, result.graph_module.state_dict()[k]) for k, v in state.items())
