"""Calibration: batches of every common shape, streaming statistics at both levels, and bad data."""
from __future__ import annotations

import weakref

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fxprune.api import analyze
from fxprune.data.calibration import (Calibration, Sums, calibration_sites, collect, gram_sites, run_batches,
                                 iter_batches)
from fxprune.errors import CalibrationError, InvalidOptionError, NonFiniteActivationError



class Net(nn.Module):
    """conv -> BN -> ReLU -> conv -> mean -> linear: producers, a BN, conv and linear consumers."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 6, 3)
        self.fc = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv(x)))
        return self.fc(self.conv2(x).mean((2, 3)))


def _net() -> Net:
    torch.manual_seed(0)
    net = Net()
    with torch.no_grad():  # non-trivial BN statistics, so a forgotten eval() would change them
        net.bn.running_mean.uniform_(-1, 1)
        net.bn.running_var.uniform_(0.5, 2)
    return net.eval()


def _loader(batches: int = 3, rows: int = 4, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(rows, 3, 8, 8, generator=gen), torch.randint(0, 5, (rows,), generator=gen))
            for _ in range(batches)]


# --- batches --------------------------------------------------------------------------------------
def test_batch_forms_give_model_input_tuples() -> None:
    x, y = torch.randn(2, 3), torch.zeros(2)
    assert [b[0] is x for b in iter_batches([x])] == [True]  # a plain tensor is the input
    assert [b[0] is x for b in iter_batches([(x, y)])] == [True]  # (inputs, target): the first
    assert [len(b) for b in iter_batches([(x, y)], n_inputs=2)] == [2]  # tuple of model inputs
    assert [b == (x, y) for b in iter_batches([((x, y), y)])] == [True]  # ((inputs...), target)
    assert [b[0] is x for b in iter_batches([{"input_ids": x, "labels": y}])] == [True]  # HF dict
    assert [b[0] is y for b in iter_batches([{"a": x, "b": y}], inputs="b")] == [True]
    assert [b[0] is y for b in iter_batches([(x, y)], inputs=1)] == [True]
    assert [b == (y, x) for b in iter_batches([{"a": x, "b": y}], inputs=("b", "a"))] == [True]
    assert [b[0] is y for b in iter_batches([[x, y]], inputs=lambda batch: batch[1])] == [True]


def test_max_batches_bounds_the_reading() -> None:
    read = []

    def data():
        for i in range(10):
            read.append(i)
            yield torch.full((1, 2), float(i))

    assert [float(b[0][0, 0]) for b in iter_batches(data(), max_batches=3)] == [0.0, 1.0, 2.0]
    assert read == [0, 1, 2, 3]  # the fourth is fetched to see the bound, never used


def test_targets_come_with_the_inputs() -> None:
    x, y = torch.randn(2, 3), torch.ones(2)
    assert [t is y for _, _, t in Calibration([(x, y)]).pairs()] == [True]
    assert [t is y for _, _, t in Calibration([{"input_ids": x, "labels": y}]).pairs()] == [True]
    assert [t is None for _, _, t in Calibration([x]).pairs()] == [True]
    assert [t is x for _, _, t in Calibration([x], target=lambda b: b).pairs()] == [True]


@pytest.mark.parametrize("data, message", [
    ([], "yielded no batches"),
    (iter([]), "one-shot iterator"),
    ([{"pixels": torch.zeros(1)}], "batch 0 has no item 'input_ids' for inputs="),
    ([torch.zeros(1), "text"], "batch 1 is a str"),
    ([(torch.zeros(1), "label")], None),  # the target is not checked: fine
    ([("a", torch.zeros(1))], "batch 0: inputs must be a tensor or a tuple of tensors, got str"),
])
def test_bad_batches_are_named(data, message) -> None:
    if message is None:
        assert len(list(iter_batches(data))) == 1
        return
    with pytest.raises(CalibrationError, match=message.replace("(", r"\(")):
        list(iter_batches(data))


@pytest.mark.parametrize("data", [torch.zeros(3), "abc", {"input_ids": torch.zeros(2)}, 3])
def test_calibration_must_be_an_iterable_of_batches(data) -> None:
    with pytest.raises(CalibrationError, match="must be an iterable of batches"):
        Calibration(data)


@pytest.mark.parametrize("bound", [0, -1, 2.5, True])
def test_max_batches_must_be_positive(bound) -> None:
    with pytest.raises(InvalidOptionError, match="max_batches must be a positive int"):
        Calibration([torch.zeros(1)], max_batches=bound)


# --- statistics -----------------------------------------------------------------------------------
def _reference_moments(net: Net, loader) -> dict[str, torch.Tensor]:
    """The same statistics by hand, from eager activations of the concatenated data."""
    x = torch.cat([b[0] for b in loader])
    with torch.no_grad():
        relu = torch.relu(net.bn(net.conv(x)))
        mean = net.conv2(relu).mean((2, 3))
    per_channel = relu.double().movedim(1, 0).reshape(8, -1)
    patches = F.unfold(relu.double(), 3).transpose(1, 2).reshape(-1, 72)
    return {"mean": per_channel.mean(1), "mean_sq": (per_channel ** 2).mean(1),
            "mean_abs": per_channel.abs().mean(1), "var": per_channel.var(1), "count": per_channel.shape[1],
            "gram_conv2": patches.T @ patches, "gram_fc": mean.double().T @ mean.double()}


def test_statistics_match_eager_activations(level: str) -> None:
    net, loader = _net(), _loader()
    analysis = analyze(net, (loader[0][0],), level)
    sites = calibration_sites(analysis)
    stats = collect(analysis.gm, loader, sites, gram_sites(analysis))
    relu = next(s.node for s in sites if s.node.startswith("relu"))
    conv2, fc = [s.node for s in gram_sites(analysis)][1:]
    ref = _reference_moments(net, loader)
    assert stats.batches == 3
    assert int(stats.count(relu)) == ref["count"] == 3 * 4 * 8 * 8
    for name in ("mean", "mean_sq", "mean_abs", "var"):
        torch.testing.assert_close(getattr(stats, name)(relu), ref[name])
    torch.testing.assert_close(stats.gram(conv2), ref["gram_conv2"])
    torch.testing.assert_close(stats.gram(fc), ref["gram_fc"])
    assert int(stats.rows(conv2)) == 3 * 4 * 6 * 6


def test_sites_cover_the_prunable_channels_of_producers_and_consumer_inputs() -> None:
    """The input's 3 and the output's 5 channels are frozen (fixed interfaces): no site sums them."""
    analysis = analyze(_net(), (torch.randn(1, 3, 8, 8),), "fx")
    assert {(s.node, s.dim, s.channels) for s in calibration_sites(analysis)} == {
        ("conv", 1, 8), ("conv2", 1, 6), ("relu", 1, 8), ("mean", 1, 6)}
    assert [(g.node, g.input, g.features) for g in gram_sites(analysis)] == [
        ("conv", "x", 27), ("conv2", "relu", 72), ("fc", "mean", 6)]
    assert [g.node for g in gram_sites(analysis, ["fc"])] == ["fc"]


def test_sites_of_the_groups_scored_alone() -> None:
    """A caller scoring one group gathers only the sites that carry its channels: conv2's 6 (its
    output and fc's input), not conv's 8."""
    analysis = analyze(_net(), (torch.randn(1, 3, 8, 8),), "fx")
    by_size = {g.size: g for g in analysis.groups}
    assert {(s.node, s.channels) for s in calibration_sites(analysis, [by_size[6]])} == {("conv2", 6), ("mean", 6)}
    assert {(s.node, s.channels) for s in calibration_sites(analysis, [by_size[8]])} == {("conv", 8), ("relu", 8)}


def test_batches_stream_and_the_model_is_untouched() -> None:
    """A train-mode model keeps its flags and BN statistics; batches are read one at a time."""
    net = _net().train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    analysis = analyze(net, (torch.randn(2, 3, 8, 8),), "fx")
    earlier: list[weakref.ref] = []
    alive_when_next_read = []

    def data():
        for seed in range(4):
            x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(seed))
            alive_when_next_read.append(sum(ref() is not None for ref in earlier))
            earlier.append(weakref.ref(x))
            yield x
            del x

    stats = collect(analysis.gm, data(), calibration_sites(analysis))
    assert stats.batches == 4 and alive_when_next_read == [0, 0, 0, 0]  # no earlier batch is held
    assert all(m.training for m in net.modules())
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_export_level_runs_a_specialised_graph_in_chunks() -> None:
    """An export graph specialised to batch 2 reads batches of 4 as two chunks: the same sums; one
    traced with a dynamic batch (the default) takes any batch size, though the rules saw batch 2."""
    net, loader = _net(), _loader()
    fx_level = analyze(net, (loader[0][0][:2],), "fx")
    export_level = analyze(net, (loader[0][0][:2],), "export", dynamic_shapes=None)
    a = collect(fx_level.gm, loader, calibration_sites(fx_level))
    b = collect(export_level.gm, loader, calibration_sites(export_level))
    torch.testing.assert_close(a.mean_abs("relu"), b.mean_abs("relu"))
    with pytest.raises(CalibrationError, match="batch 0 has 3 rows; the export-level graph is specialised "
                                               "to batch size 2"):
        collect(export_level.gm, [torch.randn(3, 3, 8, 8)], calibration_sites(export_level))
    dynamic = analyze(net, (loader[0][0][:2],), "export")
    assert collect(dynamic.gm, [torch.randn(3, 3, 8, 8)], calibration_sites(dynamic)).batches == 1


def test_batch_of_another_shape_is_named(level: str) -> None:
    analysis = analyze(_net(), (torch.randn(1, 3, 8, 8),), level)
    batch = "1" if level == "fx" else "'\\*'"  # an export graph's batch dim is dynamic: any size
    with pytest.raises(CalibrationError, match=r"batch 1 input 0 has shape \(1, 3, 9, 9\); the example "
                                               rf"inputs have \({batch}, 3, 8, 8\)"):
        collect(analysis.gm, [torch.randn(1, 3, 8, 8), torch.randn(1, 3, 9, 9)], calibration_sites(analysis))
    with pytest.raises(CalibrationError, match="batch 0 has 2 model inputs; the graph takes 1"):
        collect(analysis.gm, [((torch.randn(1, 3, 8, 8),) * 2, 0)], calibration_sites(analysis))


def test_batch_the_model_rejects_is_named() -> None:
    analysis = analyze(_net(), (torch.randn(1, 3, 8, 8),), "fx")
    with pytest.raises(CalibrationError, match=r"the model rejects calibration batch 1 .*RuntimeError"):
        collect(analysis.gm, [torch.randn(1, 3, 8, 8), torch.randn(1, 3, 8, 8, dtype=torch.float64)],
                calibration_sites(analysis))


def test_non_finite_activations_name_the_node(level: str) -> None:
    net = _net()
    with torch.no_grad():
        net.conv.weight[2, 0, 0, 0] = float("inf")
    analysis = analyze(net, (torch.randn(1, 3, 8, 8),), level)
    node = "conv" if level == "fx" else "conv2d"
    with pytest.raises(NonFiniteActivationError, match=f"batch 0 gives non-finite values at node '{node}'"):
        collect(analysis.gm, [torch.randn(1, 3, 8, 8)], calibration_sites(analysis))


def test_sums_add_over_batches() -> None:
    sums = Sums()
    sums.add("g", torch.eye(2))
    sums.add("g", 2 * torch.eye(2, dtype=torch.float16))
    assert sums["g"].dtype == torch.float64 and torch.equal(sums["g"], 3 * torch.eye(2, dtype=torch.float64))
    assert sums.all_reduce() is sums  # no process group: a no-op


def test_a_batch_runs_only_as_far_as_the_last_watched_node() -> None:
    """What follows every watched node (an LM's head over the vocabulary) is never computed."""
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).eval()
    calls = []
    net[2].register_forward_hook(lambda *_: calls.append(1))
    gm = torch.fx.symbolic_trace(net)
    seen = []
    batches = [(torch.randn(2, 4),) for _ in range(3)]
    assert run_batches(gm, batches, {"_1"}, lambda index, node, value: seen.append((index, node.name))) == 3
    assert seen == [(0, "_1"), (1, "_1"), (2, "_1")] and calls == []
    run_batches(gm, batches, {"_1", "_2"}, lambda *_: None)
    assert len(calls) == 3
