"""Recurrent rules: LSTM / GRU / RNN units with all gates tied, one unit space per layer stack, zero
initial states resized, fixed initial states frozen, at both levels."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import fxprune
from fxprune.testing.check import check_pruned



def build(factory):
    torch.manual_seed(0)
    return factory().eval()


class TextLSTM(nn.Module):
    """Embedding -> 2-layer LSTM (batch first) -> Linear on the last step."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.lstm = nn.LSTM(8, 12, num_layers=2, batch_first=True)
        self.fc = nn.Linear(12, 3)

    def forward(self, tokens):
        y, _ = self.lstm(self.emb(tokens))
        return self.fc(y[:, -1])


class GRUHead(nn.Module):
    """A classifier on the last layer's final state h_n[-1]."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 6)
        self.gru = nn.GRU(6, 10, num_layers=2)
        self.fc = nn.Linear(10, 3)

    def forward(self, x):
        _, h = self.gru(torch.tanh(self.proj(x)))
        return self.fc(h[-1])


class ElmanRNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.RNN(6, 10, nonlinearity="relu", bias=False, batch_first=True)
        self.fc = nn.Linear(10, 2)

    def forward(self, x):
        y, _ = self.rnn(x)
        return self.fc(y.mean(1))


class BiLSTM(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.lstm = nn.LSTM(8, 6, num_layers=2, bidirectional=True, batch_first=True)
        self.fc = nn.Linear(12, 3)

    def forward(self, tokens):
        y, _ = self.lstm(self.emb(tokens))
        return self.fc(y.mean(1))


class ZeroState(nn.Module):
    """An explicit zero initial state built in the graph: its literal hidden size is rewritten."""

    def __init__(self):
        super().__init__()
        self.gru = nn.GRU(6, 10, batch_first=True)
        self.fc = nn.Linear(10, 2)

    def forward(self, x):
        h0 = torch.zeros(1, x.size(0), 10)
        y, _ = self.gru(x, h0)
        return self.fc(y[:, -1])


class GivenState(nn.Module):
    """(h0, c0) come from outside: a fixed interface."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 8)
        self.lstm = nn.LSTM(8, 6)
        self.fc = nn.Linear(6, 2)

    def forward(self, x, h0, c0):
        y, _ = self.lstm(torch.relu(self.proj(x)), (h0, c0))
        return self.fc(y[-1])


class Projected(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 8)
        self.lstm = nn.LSTM(8, 6, proj_size=3)
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        y, _ = self.lstm(torch.relu(self.proj(x)))
        return self.fc(y[-1])


def tokens():
    return torch.randint(0, 20, (2, 5), generator=torch.Generator().manual_seed(0))


def sequence(shape=(2, 5, 6)):
    return torch.randn(shape, generator=torch.Generator().manual_seed(0))


CASES = {
    "lstm2": (TextLSTM, tokens),
    "gru_head": (GRUHead, lambda: sequence((5, 2, 4))),
    "rnn_relu": (ElmanRNN, sequence),
    "bilstm": (BiLSTM, tokens),
    "zero_state": (ZeroState, sequence),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_recurrent_prunes_and_verifies(prune_checked, case, level):
    factory, inputs = CASES[case]
    report = prune_checked(build(factory), inputs(), level, sparsity=0.5)
    assert report.verify.exact and report.verify.max_abs_error < 1e-5


def test_lstm_gates_and_layers_share_units(level):
    analysis = fxprune.analyze(build(TextLSTM), tokens(), level)
    group = next(g for g in analysis.groups if g.name == "lstm")
    assert group.size == 12 and group.prunable and group.exact
    root = analysis.solution.root
    units = root[analysis.params["lstm.weight_hh_l0"][1]]
    for key in ("lstm.weight_ih_l0", "lstm.weight_hh_l0", "lstm.bias_ih_l0", "lstm.weight_ih_l1",
                "lstm.bias_hh_l1"):
        gates = root[analysis.params[key][0]].view(4, 12)
        assert torch.equal(gates, units.expand(4, 12)), key  # row g*H + j is unit j for every gate
    assert torch.equal(root[analysis.params["lstm.weight_ih_l1"][1]], units)
    assert torch.equal(root[analysis.params["fc.weight"][1]], units)
    producers = {(m.key, m.dim) for m in group.members if m.producer}
    assert producers == {(f"lstm.weight_{w}_l{k}", 0) for w in ("ih", "hh") for k in (0, 1)}


def test_plan_keeps_whole_units_in_every_gate(level):
    result = fxprune.prune(build(TextLSTM), tokens(), 0.5, capture=level)
    kept = result.plan.kept_indices
    units = list(kept["lstm.weight_hh_l0"][1])
    assert len(units) == 6
    rows = [g * 12 + j for g in range(4) for j in units]
    for key in ("lstm.weight_ih_l0", "lstm.weight_hh_l0", "lstm.weight_ih_l1", "lstm.weight_hh_l1"):
        assert list(kept[key][0]) == rows, key
    assert list(kept["lstm.weight_ih_l1"][1]) == units


def test_resized_lstm_reads_its_new_weights():
    result = fxprune.prune(build(TextLSTM), tokens(), 0.5)
    lstm = result.graph_module.lstm
    assert (lstm.input_size, lstm.hidden_size) == (4, 6)
    assert len(lstm._flat_weights) == len(lstm._flat_weights_names)
    for name, weight in zip(lstm._flat_weights_names, lstm._flat_weights):
        assert weight is getattr(lstm, name), name


def test_bidirectional_output_carries_both_directions():
    result = fxprune.prune(build(BiLSTM), tokens(), 0.5)
    units = list(result.plan.kept_indices["lstm.weight_hh_l0_reverse"][1])
    assert list(result.plan.kept_indices["fc.weight"][1]) == units + [6 + j for j in units]
    assert result.graph_module.fc.in_features == 6


def test_zero_state_gets_the_new_hidden_size(level):
    result = fxprune.prune(build(ZeroState), sequence(), 0.5, capture=level)
    zeros = [n for n in result.graph_module.graph.nodes if "zeros" in str(n.target)]
    assert len(zeros) == 1 and tuple(zeros[0].meta["val"].shape) == (1, 2, 5)


def test_initial_state_from_outside_freezes_units(level):
    inputs = (sequence((5, 2, 4)), torch.zeros(1, 2, 6), torch.zeros(1, 2, 6))
    analysis = fxprune.analyze(build(GivenState), inputs, level)
    group = next(g for g in analysis.groups if g.name == "lstm")
    assert not group.prunable and "initial state" in group.reasons[0]
    kept = check_pruned(build(GivenState), inputs, capture=level).result.plan.kept_indices
    assert "lstm.weight_hh_l0" not in kept and set(kept["lstm.weight_ih_l0"]) == {1}  # only proj's outputs


def test_projected_lstm_is_unsupported(level):
    analysis = fxprune.analyze(build(Projected), sequence((5, 2, 4)), level)
    proj = next(g for g in analysis.groups if g.name == "proj")
    assert not proj.prunable and "proj_size" in proj.reasons[0]
    assert all(not m.key.startswith("lstm") for g in analysis.groups for m in g.members if m.producer)
