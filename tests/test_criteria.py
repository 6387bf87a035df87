"""Criteria: each score checked against a hand computation at both levels, normalisation and adaptive
ratios, the data they need (and the errors without it), and snapshots of models pruned with them."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxprune
from fxprune.data.calibration import Calibration
from fxprune.cli import main
from fxprune.errors import InvalidOptionError
from fxprune.options import CAPTURES
from fxprune.data.criteria import CRITERIA, DATA_CRITERIA, gather_evidence, score_groups
from fxprune.passes import MaskChannels, PruneChannels
from fxprune.passes.pipeline import Pipeline
from fxprune.core.select import adaptive_ratios, normalize_scores
from fxprune.options import NORMALIZATIONS, PruneOptions as Policy



class Net(nn.Module):
    """conv -> BN -> ReLU -> conv (+ residual) -> BN -> ReLU -> strided conv -> mean -> linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.conv3 = nn.Conv2d(8, 12, 3, stride=2, padding=1)
        self.fc = nn.Linear(12, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(x + self.bn2(self.conv2(x)))
        return self.fc(torch.relu(self.conv3(x)).mean((2, 3)))


def _net() -> Net:
    torch.manual_seed(0)
    net = Net()
    with torch.no_grad():
        for bn in (net.bn1, net.bn2):
            bn.weight.uniform_(0.2, 1.5)
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2)
    return net.eval()


def _loader(batches: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(4, 3, 8, 8, generator=gen), torch.randint(0, 4, (4,), generator=gen))
            for _ in range(batches)]


X = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(2))


def _scores(capture: str, criterion: str, **data) -> dict[str, torch.Tensor]:
    analysis = fxprune.analyze(_net(), (X,), capture)
    evidence = gather_evidence(analysis, criterion, **data)
    return score_groups(analysis, analysis.groups, criterion, evidence=evidence)


def _conv3_input(net: Net, loader) -> torch.Tensor:
    """What conv3 (the consumer of group conv1: the residual stream) reads, over all batches."""
    x = torch.cat([b[0] for b in loader])
    with torch.no_grad():
        h = torch.relu(net.bn1(net.conv1(x)))
        return torch.relu(h + net.bn2(net.conv2(h))).double()


# --- each criterion against a hand computation ----------------------------------------------------
def test_group_magnitude_sums_every_member(level: str) -> None:
    """Group conv1 (the residual stream): producer rows of conv1 and bn2's conv2, both BN scales, and
    the input columns of conv2 and conv3 — each Σw² per channel, averaged over the members."""
    net = _net()
    rows = lambda w: w.detach().double().reshape(w.shape[0], -1).pow(2).sum(1)  # noqa: E731
    cols = lambda w: rows(w.transpose(0, 1))  # noqa: E731
    members = [rows(net.conv1.weight), rows(net.conv2.weight), net.bn1.weight.double() ** 2,
               net.bn2.weight.double() ** 2, cols(net.conv2.weight), cols(net.conv3.weight)]
    expected = torch.stack([m.detach() for m in members]).mean(0)
    torch.testing.assert_close(_scores(level, "group_magnitude")["conv1"], expected)


def test_activation_wanda_and_flap_read_the_consumer_inputs(level: str) -> None:
    net, loader = _net(), _loader()
    x = _conv3_input(net, loader).movedim(1, 0).reshape(8, -1)  # channel j's every value
    w2 = net.conv2.weight.detach().double().transpose(0, 1).reshape(8, -1)
    w3 = net.conv3.weight.detach().double().transpose(0, 1).reshape(8, -1)
    relu1 = torch.relu(net.bn1(net.conv1(torch.cat([b[0] for b in loader])))).detach().double()
    r = relu1.movedim(1, 0).reshape(8, -1)
    # the stream's consumers: conv2 reads relu1 (the stream before the add), conv3 reads the stream after
    expected = {
        "activation": (r.abs().sum(1) + x.abs().sum(1)) / (r.shape[1] + x.shape[1]),
        "wanda": (w2.abs().sum(1) * r.pow(2).sum(1).sqrt() + w3.abs().sum(1) * x.pow(2).sum(1).sqrt()) / 2,
        "flap": (w2.pow(2).sum(1) * r.var(1) + w3.pow(2).sum(1) * x.var(1)) / 2,
    }
    for criterion, want in expected.items():
        torch.testing.assert_close(_scores(level, criterion, calibration=loader)["conv1"], want)


def _grad_rows(net: Net, key: str, grad: torch.Tensor, square: bool) -> torch.Tensor:
    w = dict(net.named_parameters())[key].detach().double()
    value = w * w * grad if square else w * grad
    return value.reshape(w.shape[0], -1).abs().sum(1)


def test_taylor_accumulates_gradients_over_every_batch(level: str) -> None:
    net, loader = _net(), _loader()
    for x, y in loader:
        F.cross_entropy(net(x), y).backward()  # .grad sums over the batches
    grads = {k: p.grad.double() for k, p in net.named_parameters()}
    producers = ["conv1.weight", "conv2.weight"]  # the stream's producer rows
    expected = torch.stack([_grad_rows(net, k, grads[k], False) for k in producers]).mean(0)
    got = _scores(level, "taylor", calibration=loader, loss_fn=F.cross_entropy)["conv1"]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-8)


def test_taylor_on_one_batch_still_works() -> None:
    loader = _loader(1)
    one = _scores("fx", "taylor", batch=loader[0], loss_fn=F.cross_entropy)
    whole = _scores("fx", "taylor", calibration=loader, loss_fn=F.cross_entropy)
    assert one.keys() == whole.keys()
    for name in one:
        torch.testing.assert_close(one[name], whole[name])


def test_hessian_is_the_per_sample_fisher(level: str) -> None:
    """vmap's per-sample gradients against a plain loop over samples, one backward each."""
    net, loader = _net(), _loader(2)
    fisher = {k: torch.zeros_like(p, dtype=torch.float64) for k, p in net.named_parameters()}
    for x, y in loader:
        for i in range(x.shape[0]):
            net.zero_grad()
            F.cross_entropy(net(x[i:i + 1]), y[i:i + 1]).backward()
            for k, p in net.named_parameters():
                fisher[k] += p.grad.double() ** 2
    expected = _grad_rows(net, "conv3.weight", fisher["conv3.weight"], True)
    got = _scores(level, "hessian", calibration=loader, loss_fn=F.cross_entropy)["conv3"]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-12)


def test_hessian_in_a_graph_specialised_to_a_batch_size() -> None:
    """An export graph fixed at batch 4 runs each sample as 4 copies of itself: the same Fisher."""
    from fxprune.data.calibration import fixed_batch_size
    loader = _loader(2)
    one = fxprune.analyze(_net(), (X,), "export", dynamic_shapes=None)
    four = fxprune.analyze(_net(), (loader[0][0],), "export", dynamic_shapes=None)
    assert (fixed_batch_size(one.gm), fixed_batch_size(four.gm)) == (1, 4)
    a, b = (score_groups(g, g.groups, "hessian", evidence=gather_evidence(g, "hessian", loader, F.cross_entropy))
            for g in (one, four))
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-12)


def test_both_levels_score_alike() -> None:
    loader = _loader(2)
    for criterion in ("activation", "wanda", "flap", "group_magnitude"):
        a, b = (_scores(level, criterion, calibration=loader if criterion in DATA_CRITERIA else None)
                for level in CAPTURES)
        assert a.keys() == b.keys()
        for name in a:
            torch.testing.assert_close(a[name], b[name])


# --- normalisation and adaptive ratios ------------------------------------------------------------
def test_normalisations() -> None:
    s = torch.tensor([1.0, 3.0, 2.0], dtype=torch.float64)
    expected = {"none": [1.0, 3.0, 2.0], "mean": [0.5, 1.5, 1.0], "max": [1 / 3, 1.0, 2 / 3],
                "standardize": [-1.224744871391589, 1.224744871391589, 0.0],
                "lamp": [1 / 6, 1.0, 2 / 5]}  # each over the sum of those at least as large
    assert set(expected) == set(NORMALIZATIONS)
    for how, want in expected.items():
        torch.testing.assert_close(normalize_scores(s, how), torch.tensor(want, dtype=torch.float64))
        assert torch.equal(normalize_scores(s, how).argsort(), s.argsort())  # order within a group kept


def test_adaptive_ratios_differ_per_group_and_respect_the_minimum_keep() -> None:
    analysis = fxprune.analyze(_net(), (X,), "fx")
    # conv1's units all alike, conv3's spread: ranked on standardised scores, conv3 loses more
    scores = {"conv1": torch.linspace(1.0, 1.1, 8, dtype=torch.float64),
              "conv3": torch.tensor([0.0] * 9 + [10.0] * 3, dtype=torch.float64)}
    free = adaptive_ratios(analysis, scores, Policy(0.5, global_ranking=True, normalize="standardize"))
    assert free == {"conv1": 3 / 8, "conv3": 7 / 12}  # 10 of 20 units, shared unevenly
    bounded = adaptive_ratios(analysis, scores, Policy(0.5, global_ranking=True, normalize="standardize",
                                                       min_keep_ratio=0.75))
    assert bounded == {"conv1": 2 / 8, "conv3": 3 / 12}
    uniform = adaptive_ratios(analysis, scores, Policy(0.5))
    assert uniform == {"conv1": 0.5, "conv3": 0.5}


def test_normalisation_changes_what_global_ranking_drops() -> None:
    analysis = fxprune.analyze(_net(), (X,), "fx")
    scores = {"conv1": torch.arange(1, 9, dtype=torch.float64) * 100,
              "conv3": torch.arange(1, 13, dtype=torch.float64)}
    raw = adaptive_ratios(analysis, scores, Policy(0.4, global_ranking=True, normalize="none"))
    fair = adaptive_ratios(analysis, scores, Policy(0.4, global_ranking=True, normalize="max"))
    assert raw == {"conv1": 0.0, "conv3": 8 / 12}  # raw scores: conv3's small numbers go first
    assert fair["conv1"] > 0 and fair["conv3"] < raw["conv3"]


@pytest.mark.parametrize("bad, message", [(dict(normalize="z"), "normalize must be one of"),
                                          (dict(min_keep_ratio=1.5), "min_keep_ratio must be a float"),
                                          (dict(min_keep_ratio=True), "min_keep_ratio must be a float")])
def test_policy_options_are_checked(bad, message) -> None:
    with pytest.raises(InvalidOptionError, match=message):
        Policy(0.5, **bad)


# --- data a criterion needs -----------------------------------------------------------------------
@pytest.mark.parametrize("criterion", DATA_CRITERIA)
def test_a_data_criterion_without_calibration_names_the_option(criterion: str) -> None:
    net = _net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(InvalidOptionError, match="needs calibration|calibration="):
        fxprune.prune(net, (X,), 0.5, criterion, loss_fn=F.cross_entropy)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


@pytest.mark.parametrize("criterion", ["taylor", "hessian"])
def test_a_gradient_criterion_without_a_loss_names_loss_fn(criterion: str) -> None:
    with pytest.raises(InvalidOptionError, match=f"criterion '{criterion}' needs loss_fn"):
        fxprune.prune(_net(), (X,), 0.5, criterion, calibration=_loader(1))


def test_calibration_says_which_part_of_a_batch_is_the_input() -> None:
    loader = _loader(3)
    dicts = [{"labels": y, "pixels": x} for x, y in loader]
    plain = fxprune.prune(_net(), (X,), 0.5, "wanda", calibration=[x for x, _ in loader[:2]])
    picked = fxprune.prune(_net(), (X,), 0.5, "wanda", calibration=Calibration(dicts, inputs="pixels", max_batches=2))
    assert picked.plan.kept_indices == plain.plan.kept_indices
    everything = fxprune.prune(_net(), (X,), 0.5, "wanda", calibration=Calibration(dicts, inputs="pixels"))
    assert everything.plan.kept_indices != plain.plan.kept_indices  # the third batch counts when not bounded


def test_passes_read_calibration_bound_or_given_to_the_pipeline() -> None:
    gm = fxprune.capture(_net(), (X,), "fx").gm
    loader = _loader(2)
    direct = fxprune.prune(_net(), (X,), 0.5, "wanda", calibration=loader).graph_module
    bound = PruneChannels(sparsity=0.5, criterion="wanda").with_calibration(loader)
    assert str(bound) == "prune-channels{sparsity=0.5,criterion=wanda}" and bound.needs_calibration
    assert bound(gm).graph_module.code == direct.code
    assert torch.equal(bound(gm).graph_module.conv1.weight, direct.conv1.weight)
    masked = MaskChannels(sparsity=0.5, criterion="wanda").with_calibration(loader)(gm).graph_module
    assert masked(X).shape == (1, 4)
    with pytest.raises(InvalidOptionError, match="criterion 'wanda' reads activations: it needs calibration"):
        PruneChannels(sparsity=0.5, criterion="wanda")(gm)
    with pytest.raises(InvalidOptionError, match="criterion 'hessian'"):
        PruneChannels(sparsity=0.5, criterion="hessian")
    assert not PruneChannels(sparsity=0.5).needs_calibration


def test_pipeline_hands_its_calibration_to_the_pruning_pass() -> None:
    gm = fxprune.capture(_net(), (X,), "fx").gm
    loader = _loader(2)
    pipeline = Pipeline.parse("prune-channels{sparsity=0.5,criterion=flap}")
    out = pipeline(gm, calibration=loader).graph_module
    direct = fxprune.prune(_net(), (X,), 0.5, "flap", calibration=loader).graph_module
    assert torch.equal(out.conv1.weight, direct.conv1.weight)


def test_cli_criteria_come_from_the_one_list(tmp_path: Path, capsys, monkeypatch) -> None:
    from safetensors.torch import save_file
    from fxprune.cli import build_parser
    (tmp_path / "criteria_models.py").write_text("import torch.nn as nn\n\ndef small():\n    return nn.Sequential("
                                                 "nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3), "
                                                 "nn.Flatten(), nn.Linear(128, 4)).eval()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    choices = next(a for a in build_parser()._subparsers._group_actions[0].choices["prune"]._actions
                   if a.dest == "criterion").choices
    assert tuple(choices) == CRITERIA
    data = tmp_path / "calib.safetensors"
    save_file({"input": torch.randn(8, 3, 8, 8), "target": torch.randint(0, 4, (8,))}, str(data))
    common = ["prune", "criteria_models:small", "--input-shape", "1,3,8,8", "--no-chart", "--no-progress"]
    assert main(common + ["--criterion", "wanda", "--out", str(tmp_path / "none")]) == 2
    assert "criterion 'wanda' reads calibration data: pass --calibration" in capsys.readouterr().err
    code = main(common + ["--criterion", "taylor", "--calibration", str(data), "--calibration-batch-size", "4",
                          "--out", str(tmp_path / "out")])
    assert code == 0, capsys.readouterr().err
    plan = json.loads((tmp_path / "out" / "plan.json").read_text())
    assert plan["options"]["criterion"] == "taylor"
    code = main(common + ["--criterion", "flap", "--calibration", str(data), "--global-ranking", "--normalize",
                          "standardize", "--min-keep-ratio", "0.75", "--out", str(tmp_path / "adaptive")])
    assert code == 0, capsys.readouterr().err
    plan = json.loads((tmp_path / "adaptive" / "plan.json").read_text())
    assert plan["options"]["normalize"] == "standardize" and plan["options"]["min_keep_ratio"] == 0.75
    assert len(plan["kept_indices"]["0.weight"]["0"]) == 6  # 8 channels, at least 75% kept


# --- snapshots of pruned models (every promise checked by prune_checked) ---------------------------
@pytest.mark.parametrize("criterion", ["group_magnitude", "activation", "wanda", "flap", "taylor", "hessian"])
def test_prune_with_criterion(prune_checked, graph_snapshot, criterion: str, level: str) -> None:
    loader = _loader(2)
    report = prune_checked(_net(), (X,), level, sparsity=0.5, criterion=criterion, calibration=loader,
                           loss_fn=F.cross_entropy, global_ranking=True, normalize="standardize",
                           min_keep_ratio=0.25)
    kept = "\n".join(f"{k} dim {d}: {list(v)}" for k, dims in sorted(report.result.plan.kept_indices.items())
                     for d, v in dims.items())
    assert kept == graph_snapshot(name="kept")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_slice_sums_in_chunks_equal_the_whole_reduction(monkeypatch, dtype: torch.dtype) -> None:
    """A large consumer is reduced a few rows at a time (bounded float64 transients): same sums."""
    from fxprune.data import criteria
    weight = torch.randn(7, 5, 3, generator=torch.Generator().manual_seed(0)).to(dtype)
    whole = {(dim, order): weight.double().abs().pow(order).movedim(dim, 0).reshape(weight.shape[dim], -1).sum(1)
             for dim in range(3) for order in (1, 2)}
    monkeypatch.setattr(criteria, "_CHUNK", 4)  # fewer elements than one slice: one outer row a chunk
    for (dim, order), expected in whole.items():
        torch.testing.assert_close(criteria._slice_sums(weight, dim, order, torch.float64), expected)
