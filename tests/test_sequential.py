"""fxprune.data.sequential: every batch walked through a graph together, each node run once per batch,
so reconstruct costs linear in depth; the per-block API refits a block given its inputs."""
from __future__ import annotations

import pytest
import torch
import torch.fx as fx
import torch.nn as nn

import fxprune
from fxprune.data import sequential
from fxprune.data.sequential import Stop, Walk, refit_block
from fxprune.errors import CalibrationError


def _mlp(depth: int) -> nn.Module:
    torch.manual_seed(0)
    layers = []
    for _ in range(depth):
        layers += [nn.Linear(16, 16), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(16, 4)).eval()


BATCHES = [torch.randn(8, 16, generator=torch.Generator().manual_seed(s)) for s in range(3)]


def test_walk_computes_the_graphs_outputs():
    gm = fx.symbolic_trace(_mlp(3))
    walk = Walk(gm, [(x,) for x in BATCHES])
    assert torch.equal(walk.values_at("_2")[1], gm.get_submodule("2")(gm.get_submodule("1")(
        gm.get_submodule("0")(BATCHES[1]))))
    walk.run_before("_4")
    outputs = walk.finish()
    assert all(torch.equal(out, gm(x)) for out, x in zip(outputs, BATCHES))


def test_walk_refuses_a_stop_it_has_passed():
    walk = Walk(fx.symbolic_trace(_mlp(2)), [(BATCHES[0],)])
    walk.values_at("_3")
    with pytest.raises(CalibrationError, match="node '_2' has already run"):
        walk.run_before("_2")


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_reconstruct_runs_each_node_once_per_batch(capture, monkeypatch):
    """The cost of calibration + reconstruct is one run of each graph per batch, whatever the depth
    (it used to rerun both graphs from the input for every refitted layer: quadratic)."""
    runs = {}
    counted = Walk._run

    def count(self, node, env, index):
        runs[(id(self), node.name, index)] = runs.get((id(self), node.name, index), 0) + 1
        return counted(self, node, env, index)

    monkeypatch.setattr(Walk, "_run", count)
    for depth in (2, 6):
        runs.clear()
        model = _mlp(depth)
        result = fxprune.prune(model, (BATCHES[0],), sparsity=0.5, criterion="l1", capture=capture,
                               calibration=BATCHES, recover=("reconstruct",))
        assert len(result.recovery[0].layers) == depth
        assert set(runs.values()) == {1}  # no node of either graph ran twice on a batch
        assert len({key[0] for key in runs}) == 2  # one walk of the original, one of the pruned graph


def test_refit_block_fits_the_block_and_returns_its_outputs():
    """One block of a block-by-block pipeline: given both blocks' inputs, the pruned block's layer is
    refitted to the original's outputs, and both blocks' outputs come back for the next block."""
    torch.manual_seed(0)
    original = fx.symbolic_trace(nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4)))
    pruned = fx.symbolic_trace(nn.Sequential(nn.Linear(16, 6), nn.ReLU(), nn.Linear(6, 4)))
    xs = [(x,) for x in BATCHES]

    def refit(stop, targets, inputs):
        x, y = torch.cat(inputs), torch.cat(targets)
        ones = torch.ones(x.shape[0], 1)
        solution = torch.linalg.lstsq(torch.cat([x, ones], 1).double(), y.double()).solution.T.float()
        layer = pruned.get_submodule("2")
        with torch.no_grad():
            layer.weight.copy_(solution[:, :-1])
            layer.bias.copy_(solution[:, -1])
        return float((x @ layer.weight.T + layer.bias - y).detach().norm() / y.norm())

    outs_o, outs_p, errors = refit_block(original, pruned, [Stop("_2", "_1", "_2")], xs, xs, refit)
    assert all(torch.equal(o, original(x)) for o, (x,) in zip(outs_o, xs))
    assert all(torch.allclose(p, pruned(x)) for p, (x,) in zip(outs_p, xs))  # the refitted weights ran
    assert errors[0] < 0.5

