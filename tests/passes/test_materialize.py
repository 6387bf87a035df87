"""materialize: a masked graph becomes the pruned one; fine-tuned weights are kept, masks go."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import fxprune
from fxprune.core.capture import capture
from fxprune.errors import PipelineError
from fxprune.passes import MaskChannels, Materialize
from fxprune.core.meta import PLAN_KEY
from fxprune.passes.mask_channels import is_mask
from fxprune.measure import count_params
from pass_nets import ResidualNet as Net

X = torch.randn(2, 3, 8, 8)


def _same_state(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _masked(level: str, model: nn.Module = None, **options) -> torch.fx.GraphModule:
    return MaskChannels(**options)(capture(model or Net().eval(), (X,), level).gm).graph_module


def _fine_tune(gm: torch.fx.GraphModule, steps: int = 3) -> None:
    """SGD with weight decay: the dropped channels' own weights change too."""
    opt = torch.optim.SGD(gm.parameters(), lr=0.1, weight_decay=0.1)
    for _ in range(steps):
        opt.zero_grad()
        gm(torch.randn(2, 3, 8, 8)).square().mean().backward()
        opt.step()


def test_golden_equals_prune(level: str, run_pure, graph_snapshot) -> None:
    model = Net().eval()
    result = run_pure(Materialize(), _masked(level, model, sparsity=0.5))
    assert result.modified and result.graph_module == graph_snapshot
    pruned = fxprune.prune(model, (X,), sparsity=0.5, capture=level).graph_module
    assert result.graph_module.code == pruned.code and _same_state(result.graph_module, pruned)
    assert not any(is_mask(n) for n in result.graph_module.graph.nodes)
    assert PLAN_KEY not in result.graph_module.meta


def test_fine_tuned_masked_model_materializes_to_the_same_function(level: str, run_pure) -> None:
    masked = _masked(level, sparsity=0.5)
    before = {k: v.clone() for k, v in masked.state_dict().items()}
    masked.train()
    _fine_tune(masked)
    masked.eval()
    changed = [k for k, v in masked.state_dict().items() if not torch.equal(v, before[k])]
    assert "conv1.weight" in changed and "conv3.weight" in changed
    small = run_pure(Materialize(), masked).graph_module
    assert count_params(small) < count_params(masked)
    with torch.no_grad():
        torch.testing.assert_close(small(X), masked(X), rtol=1e-5, atol=1e-5)


def test_materialize_keeps_the_training_flag() -> None:
    masked = _masked("fx", sparsity=0.5).train()
    small = Materialize()(masked).graph_module
    assert small.training and small.bn1.training and small.conv1.weight.requires_grad


def test_an_unmasked_graph_is_copied_unmodified(run_pure) -> None:
    gm = capture(Net().eval(), (X,)).gm
    result = run_pure(Materialize(), gm)
    assert not result.modified and result.graph_module.code == gm.code


def test_masks_without_a_plan_are_refused() -> None:
    masked = _masked("fx", sparsity=0.5)
    del masked.meta[PLAN_KEY]
    with pytest.raises(PipelineError, match="fxprune_mask_0.*no plan"):
        Materialize()(masked)
