"""reconstruct: consumers of dropped channels refitted by least squares, layer after layer, both levels."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import fxprune
from fxprune.core.capture import capture
from fxprune.core.meta import REPORTS_KEY
from fxprune.errors import CalibrationError, InvalidOptionError, NonFiniteActivationError, PipelineError
from fxprune.passes import Reconstruct
from fxprune.passes.pipeline import Pipeline
from fxprune.data.recovery import RecoveryWarning

from pass_nets import ResidualNet


class LowRank(nn.Module):
    """A 1x1 conv lifts 3 channels to 8 (rank 3), a 3x3 conv and a linear read them: any 4 kept
    channels span the 8, so the pruned model can reproduce the original exactly."""

    def __init__(self) -> None:
        super().__init__()
        self.lift = nn.Conv2d(3, 8, 1, bias=False)
        self.conv = nn.Conv2d(8, 6, 3, padding=1, bias=False)
        self.fc = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(self.lift(x)).mean((2, 3)))


class TwoLayers(nn.Module):
    """Two consumers of pruned channels, so the second is fitted to what the refitted first produces."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(6, 12), nn.Linear(12, 10), nn.Linear(10, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def _loader(shape: tuple, batches: int = 3, rows: int = 32) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(rows, *shape, generator=gen) for _ in range(batches)]


def _pruned(model: nn.Module, x: torch.Tensor, level: str, sparsity: float = 0.5) -> fxprune.PruneResult:
    return fxprune.prune(model, (x,), sparsity=sparsity, capture=level)


def test_exact_when_kept_channels_span_the_dropped(run_pure, level) -> None:
    model = LowRank().eval()
    loader = _loader((3, 6, 6))
    result = fxprune.prune(model, (loader[0],), sparsity={"lift": 0.5}, capture=level)
    assert len(result.plan.kept_indices["conv.weight"][1]) == 4 and "fc.weight" not in result.plan.kept_indices
    with pytest.warns(RecoveryWarning, match="'conv'"):  # rank 3 of 4 kept (+ the bias column): singular
        out = run_pure(Reconstruct(ridge=0.0).with_calibration(loader, source=result), result.graph_module)
    x = torch.randn(5, 3, 6, 6)
    with torch.no_grad():
        before = (result.graph_module(x) - model(x)).abs().max()
        after = (out.graph_module(x) - model(x)).abs().max()
    assert before > 1e-2 and after < 1e-4
    report = out.graph_module.meta[REPORTS_KEY][-1]
    assert [r.layer for r in report.layers] == ["conv"]
    assert report.layers[0].before > 0.1 and report.layers[0].after < 1e-4
    assert out.modified


def _lstsq_fit(x_kept: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    rows = torch.cat([x_kept, torch.ones(len(x_kept), 1, dtype=x_kept.dtype)], dim=1)
    return torch.linalg.lstsq(rows, target).solution.T  # (out, in + 1)


def test_layers_are_fitted_in_order_to_the_pruned_models_inputs() -> None:
    # fc2 is refitted on the inputs fc1 produces *after* fc1's own refit: checked against plain
    # float64 lstsq done by hand in the same order
    model = TwoLayers().eval()
    loader = _loader((6,), batches=2, rows=64)
    result = _pruned(model, loader[0], "fx")
    out, report = fxprune.data.recovery.reconstruct(result.analysis, result.drop, result.graph_module, loader,
                                               ridge=0.0)
    x = torch.cat(loader).double()
    ref = copy.deepcopy(model).double()
    pruned = copy.deepcopy(result.graph_module).double()
    kept1 = result.plan.kept_indices["fc2.weight"][1]
    kept2 = result.plan.kept_indices["fc3.weight"][1]
    with torch.no_grad():
        h1 = torch.relu(pruned.fc1(x))  # fc1 is a producer only: unchanged
        w2 = _lstsq_fit(h1, ref.fc2(torch.relu(ref.fc1(x)))[:, list(kept2)])
        h2 = torch.relu(h1 @ w2[:, :-1].T + w2[:, -1])
        w3 = _lstsq_fit(h2, ref(x))
    assert len(kept1) == 6 and len(kept2) == 5
    torch.testing.assert_close(out.fc2.weight.double(), w2[:, :-1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.fc3.weight.double(), w3[:, :-1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.fc3.bias.double(), w3[:, -1], atol=1e-4, rtol=1e-4)
    assert [r.layer for r in report.layers] == ["fc2", "fc3"]
    assert all(r.after < r.before for r in report.layers)


@pytest.mark.slow
def test_both_levels_fit_the_same_weights() -> None:
    model = ResidualNet().eval()
    loader = _loader((3, 8, 8), batches=2, rows=16)
    fits = {}
    for level in ("fx", "export"):
        result = _pruned(model, loader[0], level)
        out, report = fxprune.data.recovery.reconstruct(result.analysis, result.drop, result.graph_module, loader)
        fits[level] = ({r.layer: round(r.after, 4) for r in report.layers}, out.state_dict()["conv3.weight"])
    assert fits["fx"][0] == fits["export"][0] and set(fits["fx"][0]) == {"conv2", "conv3", "fc"}
    torch.testing.assert_close(fits["fx"][1], fits["export"][1], atol=1e-5, rtol=1e-4)


def test_prune_with_recover_reports_fit_and_verifies_the_structural_prune() -> None:
    model = ResidualNet().eval()
    state = copy.deepcopy(model.state_dict())
    loader = [(x, torch.zeros(len(x))) for x in _loader((3, 8, 8), batches=1, rows=8)]
    x = loader[0][0]
    result = fxprune.prune(model, (x,), sparsity=0.5, calibration=loader, recover=("reconstruct", "batchnorm"))
    assert [r.step for r in result.recovery] == ["reconstruct", "recalibrate-batchnorm"]
    assert all(r.after < r.before for r in result.recovery[0].layers)
    assert fxprune.verify(model, result, (x,)).passed  # checks result.structural, before recovery
    with torch.no_grad():
        assert not torch.allclose(result.graph_module(x), result.structural(x))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_snapshot(graph_snapshot, level) -> None:
    model = LowRank().eval()
    loader = _loader((3, 6, 6))
    gm = capture(model, (loader[0],), level).gm
    result = Pipeline.parse("prune-channels{sparsity=0.5,ignore=[conv]},reconstruct")(gm, calibration=loader)
    assert result.graph_module == graph_snapshot  # export: the conv gains a fitted bias parameter


def test_skipped_layers_say_why() -> None:
    class Conv1d(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv1d(3, 8, 1), nn.Conv1d(8, 8, 3)
            self.fc = nn.Linear(8, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.b(torch.relu(self.a(x))).mean(2))

    loader = _loader((3, 9), batches=1)
    result = fxprune.prune(Conv1d().eval(), (loader[0],), sparsity=0.5)
    _, report = fxprune.data.recovery.reconstruct(result.analysis, result.drop, result.graph_module, loader)
    assert [r.layer for r in report.layers] == ["fc"]
    assert report.skipped == (("b", "module b is not an ungrouped, zero-padded conv2d"),)
    assert "b: skipped (" in str(report)


def test_bad_input_errors_name_the_option_and_leave_the_model_alone() -> None:
    model = ResidualNet().eval()
    x = _loader((3, 8, 8), batches=1, rows=4)[0]
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(InvalidOptionError, match="ridge"):
        Reconstruct(ridge=-1.0)
    with pytest.raises(PipelineError, match="ridge"):
        Pipeline.parse("reconstruct{ridge=-1}")
    with pytest.raises(InvalidOptionError, match="recovery step 'retrain'"):
        fxprune.prune(model, (x,), calibration=[x], recover=("retrain",))
    with pytest.raises(CalibrationError, match=r"recover=\['reconstruct'\] needs calibration data"):
        fxprune.prune(model, (x,), recover=("reconstruct",))
    with pytest.raises(CalibrationError, match="no batches"):
        fxprune.prune(model, (x,), calibration=[], recover=("reconstruct",))
    with pytest.raises(CalibrationError, match="batch 1 input 0 has shape"):
        fxprune.prune(model, (x,), calibration=[x, torch.randn(4, 3)], recover=("reconstruct",))
    with pytest.raises(NonFiniteActivationError, match="calibration batch 0"):
        fxprune.prune(model, (x,), calibration=[x * float("nan")], recover=("reconstruct",))
    gm = capture(model, (x,)).gm
    with pytest.raises(CalibrationError, match="'reconstruct' needs calibration data"):
        Pipeline.parse("prune-channels{sparsity=0.5},reconstruct")(gm)
    with pytest.raises(CalibrationError, match="'reconstruct' needs calibration data"):
        Reconstruct()(gm)
    with pytest.raises(PipelineError, match="carries no pruning plan"):
        Pipeline.parse("reconstruct")(gm, calibration=[x])
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


@pytest.mark.parametrize("ridge", [1e-3, 1.0])
def test_the_fitted_error_from_the_solve_equals_the_error_from_the_gram_matrix(ridge) -> None:
    """The report's 'after' error comes from the solve's own right-hand side in O(out·in); it must be
    the error the moments give for the refitted weights (``W G Wᵀ`` multiplied out)."""
    from fxprune.data.recovery import _damped_solve, _solved_error, relative_error
    gen = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(200, 9, generator=gen, dtype=torch.float64), torch.ones(200, 1, dtype=torch.float64)], 1)
    y = x[:, :9] @ torch.randn(9, 5, generator=gen, dtype=torch.float64) + 0.1 * torch.randn(200, 5, generator=gen,
                                                                                           dtype=torch.float64)
    gram, cross, yy = x.T @ x, x.T @ y, float((y * y).sum())
    prior = torch.randn(10, 5, generator=gen, dtype=torch.float64)
    solution, rhs, damping = _damped_solve(gram, cross, ridge, "fc", prior)
    fitted = _solved_error(solution, rhs, damping, cross, yy)
    direct = float(torch.linalg.vector_norm(x @ solution - y) / torch.linalg.vector_norm(y))
    assert fitted == pytest.approx(direct, rel=1e-9)
    assert relative_error(solution.T, gram, cross, yy) == pytest.approx(direct, rel=1e-9)
    assert relative_error(prior.T, gram.float(), cross, yy) == pytest.approx(
        float(torch.linalg.vector_norm(x @ prior - y) / torch.linalg.vector_norm(y)), rel=1e-5)
