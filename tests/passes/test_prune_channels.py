"""prune-channels: the pass is fxprune.prune on a captured graph; one case per option."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.fx.passes.infra.pass_manager import PassManager

import fxprune
from fxprune.core.capture import capture
from fxprune.errors import InvalidOptionError, PipelineError
from fxprune.passes import PruneChannels
from fxprune.measure import count_params
from pass_nets import ResidualNet as Net


X = torch.randn(2, 3, 8, 8)
OPTIONS = {
    "sparsity": dict(sparsity=0.25),
    "criterion-l2": dict(sparsity=0.5, criterion="l2"),
    "criterion-fpgm": dict(sparsity=0.5, criterion="fpgm"),
    "criterion-bn_scale": dict(sparsity=0.5, criterion="bn_scale"),
    "criterion-random": dict(sparsity=0.5, criterion="random", seed=3),
    "reduce-max": dict(sparsity=0.5, reduce="max"),
    "global_ranking": dict(sparsity=0.5, global_ranking=True),
    "round_to": dict(sparsity=0.75, round_to=4),
    "min_keep": dict(sparsity=0.9, min_keep=6),
    "ignore": dict(sparsity=0.5, ignore=("conv3",)),
    "prune_outputs": dict(sparsity=0.5, prune_outputs=True),
    "split_axis-outer": dict(sparsity=0.5, split_axis="outer"),
}


def _captured(level: str = "fx"):
    return capture(Net().eval(), (X,), level).gm


@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
def test_options(options, run_pure, graph_snapshot) -> None:
    gm = _captured()
    result = run_pure(PruneChannels(**options), gm)
    expected = fxprune.prune(gm, (X,), **options)
    assert result.graph_module == graph_snapshot
    assert result.modified
    assert result.graph_module.code == expected.graph_module.code
    got, want = result.graph_module.state_dict(), expected.graph_module.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    assert count_params(result.graph_module) < count_params(gm)
    if not options.get("prune_outputs"):  # the reference keeps the output's width
        assert fxprune.verify(gm, expected, (X,)).passed


def test_counts_and_numerics(run_pure) -> None:
    gm = _captured()
    pruned = run_pure(PruneChannels(sparsity=0.5), gm).graph_module
    assert pruned.conv1.out_channels == pruned.conv2.out_channels == 4
    assert (pruned.conv3.out_channels, pruned.fc.in_features, pruned.fc.out_features) == (8, 8, 10)
    assert pruned(X).shape == gm(X).shape
    assert all("val" in n.meta for n in pruned.graph.nodes if n.op != "output")  # ready for the next pass


def test_export_level(run_pure, graph_snapshot) -> None:
    gm = _captured("export")
    result = run_pure(PruneChannels(sparsity=0.5), gm)
    assert result.graph_module == graph_snapshot
    assert result.graph_module(X).shape == (2, 10)
    assert count_params(result.graph_module) < count_params(gm)


def test_zero_sparsity_is_not_a_modification(run_pure) -> None:
    gm = _captured()
    result = run_pure(PruneChannels(sparsity=0.0), gm)
    assert not result.modified
    torch.testing.assert_close(result.graph_module(X), gm(X), rtol=0, atol=0)


def test_one_shot_prunes_again_when_run_again() -> None:
    gm = _captured()
    result = PassManager(passes=[PruneChannels(sparsity=0.5)], steps=2)(gm)
    assert result.modified
    assert result.graph_module.conv1.out_channels == 2  # 8 -> 4 -> 2: each run prunes once more


@pytest.mark.parametrize("bad", [dict(sparsity=1.0), dict(sparsity=0.5, criterion="taylor"),
                                 dict(sparsity=0.5, criterion="nope"), dict(sparsity=0.5, round_to=0),
                                 dict(sparsity=0.5, split_axis="inner"), dict(sparsity="half")])
def test_bad_options_are_refused(bad) -> None:
    with pytest.raises(InvalidOptionError):
        PruneChannels(**bad)


def test_options_are_typed_fields() -> None:
    p = PruneChannels(sparsity=1 // 2, ignore=["fc"])  # int -> float, list -> tuple: hashable
    assert p.sparsity == 0.0 and isinstance(p.sparsity, float) and p.ignore == ("fc",)
    assert hash(p) == hash(PruneChannels(sparsity=0.0, ignore=("fc",)))
    assert str(p) == "prune-channels{sparsity=0.0,ignore=[fc]}"
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.sparsity = 0.5  # type: ignore[misc]


def test_needs_a_captured_graph() -> None:
    gm = torch.fx.symbolic_trace(Net().eval())
    with pytest.raises(PipelineError, match="capture"):
        PruneChannels(sparsity=0.5)(gm)
