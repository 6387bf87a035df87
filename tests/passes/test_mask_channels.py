"""mask-channels: explicit mask nodes where a prune would cut; the masked model equals the pruned one."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.passes.infra.pass_manager import PassManager

import fxprune
from fxprune.core.capture import capture
from fxprune.errors import InvalidOptionError, UnsupportedModelError
from fxprune.passes import MaskChannels, Materialize, PruneChannels
from fxprune.core.meta import PLAN_KEY
from fxprune.passes.mask_channels import is_mask, masked_plan
from fxprune.passes.pipeline import Pipeline
from fxprune.measure import count_params
from pass_nets import ResidualNet as Net

X = torch.randn(2, 3, 8, 8)


class Attention(nn.Module):
    """A matmul contracting two activations (an act sink) and a loose get_attr weight at fx level."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(8, 16), nn.Linear(8, 16), nn.Linear(8, 16),
                                          nn.Linear(16, 8))
        self.w1, self.w2 = nn.Parameter(torch.randn(12, 8)), nn.Parameter(torch.randn(8, 12))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = (self.q(x) @ self.k(x).transpose(-1, -2)).softmax(-1)
        return self.o(a @ self.v(x)) + F.linear(torch.relu(F.linear(x, self.w1)), self.w2)


class Recurrent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm, self.fc = nn.LSTM(8, 12, batch_first=True), nn.Linear(12, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.lstm(x)[0])


def _masks(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if is_mask(n)]


def _close(a: torch.nn.Module, b: torch.nn.Module, *inputs: torch.Tensor) -> None:
    with torch.no_grad():
        torch.testing.assert_close(a(*inputs), b(*inputs), rtol=1e-5, atol=1e-5)


def test_golden(level: str, run_pure, graph_snapshot) -> None:
    gm = capture(Net().eval(), (X,), level).gm
    result = run_pure(MaskChannels(sparsity=0.5), gm)
    assert result.modified
    assert result.graph_module == graph_snapshot


def test_masked_equals_pruned(level: str, run_pure) -> None:
    gm = capture(Net().eval(), (X,), level).gm
    masked = run_pure(MaskChannels(sparsity=0.5), gm).graph_module
    pruned = fxprune.prune(gm, (X,), sparsity=0.5)
    _close(masked, pruned.graph_module, X)
    assert count_params(masked) == count_params(gm)  # nothing is cut
    assert masked_plan(masked).kept_indices == pruned.plan.kept_indices


def test_masks_are_named_buffers_in_the_code(level: str) -> None:
    gm = capture(Net().eval(), (X,), level).gm
    masked = MaskChannels(sparsity=0.5)(gm).graph_module
    masks = _masks(masked)
    names = [str(n.args[1].target) for n in masks]
    assert names == [f"fxprune_mask_{i}" for i in range(len(masks))] and len(masks) == 3
    buffers = dict(masked.named_buffers())
    assert all(buffers[n].dtype == torch.float32 for n in names)
    mul = "torch.ops.aten.mul.Tensor(" if level == "export" else "torch.mul("
    assert masked.code.count(mul) == len(masks)
    assert sorted(int(buffers[n].sum()) for n in names) == [4, 4, 8]  # 8 -> 4 kept twice, conv3 16 -> 8


def test_fx_masks_the_layer_inputs_export_the_weights() -> None:
    fx_masks = _masks(MaskChannels(sparsity=0.5)(capture(Net().eval(), (X,)).gm).graph_module)
    assert {u.target for n in fx_masks for u in n.users} == {"conv2", "conv3", "fc"}
    ex_masks = _masks(MaskChannels(sparsity=0.5)(capture(Net().eval(), (X,), "export").gm).graph_module)
    assert {str(n.args[0].target) for n in ex_masks} == {"conv2.weight", "conv3.weight", "fc.weight"}


def test_activation_contractions_and_loose_weights(level: str, run_pure) -> None:
    x = torch.randn(2, 5, 8)
    gm = capture(Attention().eval(), (x,), level).gm
    masked = run_pure(MaskChannels(sparsity=0.5), gm).graph_module
    _close(masked, fxprune.prune(gm, (x,), sparsity=0.5).graph_module, x)
    matmuls = [n for n in masked.graph.nodes if "matmul" in str(n.target) or "bmm" in str(n.target)
               or n.target is torch.ops.aten.mm.default]
    # both levels: the contraction's activation is masked where the matmul reads it, and the loose
    # weight w2 (a get_attr at either level) right where it is read
    assert any(is_mask(a) for n in matmuls for a in n.args if isinstance(a, torch.fx.Node))
    assert any(n.args[0].op == "get_attr" and n.args[0].target == "w2" for n in _masks(masked))


def test_a_recurrent_layer_is_masked_at_export_level_and_refused_at_fx(run_pure) -> None:
    x = torch.randn(2, 5, 8)
    model = Recurrent().eval()
    with pytest.raises(UnsupportedModelError, match="'lstm'.*export level"):
        MaskChannels(sparsity=0.5)(capture(model, (x,)).gm)
    gm = capture(model, (x,), "export").gm
    masked = run_pure(MaskChannels(sparsity=0.5), gm).graph_module
    _close(masked, fxprune.prune(gm, (x,), sparsity=0.5).graph_module, x)


def test_gradients_of_dropped_channels_are_zero() -> None:
    masked = MaskChannels(sparsity=0.5)(capture(Net().eval(), (X,)).gm).graph_module
    keep = masked_plan(masked).kept_indices["conv2.weight"][1]
    masked(X).sum().backward()
    grad = masked.conv2.weight.grad
    dropped = [i for i in range(8) if i not in keep]
    assert grad[:, dropped].abs().max() == 0 and grad[:, list(keep)].abs().max() > 0


def test_a_plan_masks_exactly_what_it_drops(run_pure) -> None:
    model = Net().eval()
    plan = fxprune.prune(model, (X,), sparsity=0.5, criterion="random", seed=4).plan
    masked = run_pure(MaskChannels.of(plan), capture(model, (X,)).gm).graph_module
    assert masked_plan(masked).kept_indices == plan.kept_indices
    _close(masked, fxprune.apply_plan(model, plan, (X,)).graph_module, X)


def test_masking_again_only_adds_channels() -> None:
    gm = capture(Net().eval(), (X,)).gm
    first = MaskChannels(sparsity=0.25, criterion="random", seed=1)(gm).graph_module
    second = MaskChannels(sparsity=0.5, criterion="random", seed=2)(first).graph_module
    assert len(_masks(second)) == len(_masks(first)) == 3  # replaced, not stacked
    kept1, kept2 = masked_plan(first).kept_indices, masked_plan(second).kept_indices
    for key in ("conv1.weight", "conv3.weight"):
        assert set(kept2[key][0]) < set(kept1[key][0])
    _close(second, Materialize()(second).graph_module, X)


def test_zero_sparsity_masks_nothing(run_pure) -> None:
    gm = capture(Net().eval(), (X,)).gm
    result = run_pure(MaskChannels(sparsity=0.0), gm)
    assert not result.modified and not _masks(result.graph_module)


def test_in_pass_manager_and_pipeline() -> None:
    gm = capture(Net().eval(), (X,)).gm
    pruned = PruneChannels(sparsity=0.5)(gm).graph_module
    result = PassManager(passes=[MaskChannels(sparsity=0.5), Materialize()])(gm)
    assert result.modified and result.graph_module.code == pruned.code
    spec = Pipeline.parse("mask-channels{sparsity=0.25,criterion=l2},materialize")
    assert str(spec) == "mask-channels{sparsity=0.25,criterion=l2},materialize"
    assert spec(gm).graph_module.code == PruneChannels(sparsity=0.25, criterion="l2")(gm).graph_module.code


@pytest.mark.parametrize("bad", [dict(sparsity=1.0), dict(criterion="taylor"), dict(round_to=0),
                                 dict(plan_json="{}"), dict(split_axis="inner")])
def test_bad_options_are_refused(bad) -> None:
    with pytest.raises(InvalidOptionError):
        MaskChannels(**bad)


def test_a_plan_and_selection_options_are_exclusive() -> None:
    plan = fxprune.prune(Net().eval(), (X,), sparsity=0.5).plan
    with pytest.raises(InvalidOptionError, match="not both"):
        MaskChannels(plan_json=plan.to_json(), sparsity=0.25)


def test_the_plan_is_recorded_as_json() -> None:
    masked = MaskChannels(sparsity=0.5)(capture(Net().eval(), (X,)).gm).graph_module
    assert isinstance(masked.meta[PLAN_KEY], str) and masked.meta[PLAN_KEY].startswith('{"format"')
