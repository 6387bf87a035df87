"""recalibrate-batchnorm: BatchNorm running statistics re-measured on calibration data, both levels."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import fxprune
from fxprune.core.capture import capture
from fxprune.core.meta import REPORTS_KEY
from fxprune.errors import CalibrationError, PipelineError
from fxprune.passes import RecalibrateBatchNorm
from fxprune.passes.pipeline import Pipeline
from fxprune.data.recovery import batch_norms

from pass_nets import ResidualNet


def _loader(batches: int = 2, rows: int = 8) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    return [torch.randn(rows, 3, 8, 8, generator=gen) * 2 + 1 for _ in range(batches)]


def _stats(gm: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in gm.state_dict().items() if k.endswith(("running_mean", "running_var"))}


def test_one_batch_equals_torch_train_mode_update(run_pure, level) -> None:
    # on one batch, torch's own train-mode forward with momentum 1 gives exactly the batch statistics
    # (unbiased variance), with every BatchNorm normalising by its batch's statistics: the definition
    loader = _loader(batches=1)
    model = ResidualNet().eval()
    gm = capture(model, (loader[0],), level).gm
    out = run_pure(RecalibrateBatchNorm().with_calibration(loader), gm)
    reference = copy.deepcopy(model).train()
    for m in reference.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = 1.0
    with torch.no_grad():
        reference(loader[0])
    got = _stats(out.graph_module)
    assert set(got) == set(_stats(reference)) == {f"bn{i}.running_{s}" for i in (1, 2) for s in ("mean", "var")}
    for key, value in _stats(reference).items():
        torch.testing.assert_close(got[key], value, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got["bn1.running_mean"], model.bn1.running_mean)
    report = out.graph_module.meta[REPORTS_KEY][-1]
    assert report.step == "recalibrate-batchnorm" and [r.layer for r in report.layers] == ["bn1", "bn2"]
    assert report.batches == 1 and out.modified


def test_several_batches_give_population_moments() -> None:
    # bn1 reads conv1's output: its new statistics are the moments over all the calibration rows
    loader = _loader(batches=3)
    model = ResidualNet().eval()
    gm = capture(model, (loader[0],)).gm
    new, report = fxprune.data.recovery.recalibrate_batchnorm(gm, loader)
    with torch.no_grad():
        y = model.conv1(torch.cat(loader)).double()
    torch.testing.assert_close(new.bn1.running_mean.double(), y.mean((0, 2, 3)), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(new.bn1.running_var.double(), y.transpose(0, 1).flatten(1).var(1),
                               atol=1e-5, rtol=1e-5)
    assert report.batches == 3 and report.layers[0].before > 0


def test_after_pruning_in_a_pipeline(graph_snapshot) -> None:
    loader = _loader()
    model = ResidualNet().eval()
    gm = capture(model, (loader[0],), "export").gm
    result = Pipeline.parse("prune-channels{sparsity=0.5},recalibrate-batchnorm")(gm, calibration=loader)
    assert result.graph_module == graph_snapshot  # shapes as pruned; statistics are values, not code
    assert [n.layer for n in batch_norms(result.graph_module)] == ["bn1", "bn2"]
    assert result.graph_module.bn1.running_mean.shape == (4,)


def test_bad_input_errors_name_the_pass_and_leave_the_graph_alone() -> None:
    loader = _loader(batches=1)
    gm = capture(ResidualNet().eval(), (loader[0],)).gm
    state = copy.deepcopy(gm.state_dict())
    with pytest.raises(CalibrationError, match="'recalibrate-batchnorm' needs calibration data"):
        RecalibrateBatchNorm()(gm)
    with pytest.raises(CalibrationError, match="'recalibrate-batchnorm' needs calibration data"):
        Pipeline.parse("recalibrate-batchnorm")(gm)
    with pytest.raises(CalibrationError, match="no batches"):
        RecalibrateBatchNorm().with_calibration([])(gm)
    with pytest.raises(PipelineError, match="batch 0 input 0 has shape"):
        Pipeline.parse("recalibrate-batchnorm")(gm, calibration=[torch.randn(2, 3, 5)])
    assert all(torch.equal(v, gm.state_dict()[k]) for k, v in state.items())
