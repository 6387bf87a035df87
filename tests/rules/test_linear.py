"""Linear layers and matrix products, spelling by spelling: ``nn.Linear``, ``F.linear``, ``x @ W`` with a
loose parameter, ``addmm``, ``bmm`` of two activations, ``matmul`` broadcasting a batch dim, ``einsum``
broadcasting a size-1 letter, and ``x @ w.T``. Each case: which tensors the hidden group slices (the
unit test), a snapshot of the pruned graph, and verify against the reference, at both levels."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxprune
from fxprune.options import CAPTURES



class LooseMatmul(nn.Module):
    """``x @ W[in, out]`` with a bare parameter: W's columns produce the hidden features."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, 16) / 3)
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        return self.fc(torch.relu(x @ self.w))


class Addmm(nn.Module):
    """HF's Conv1D: ``addmm(b, x, W)``."""

    def __init__(self):
        super().__init__()
        self.w, self.b = nn.Parameter(torch.randn(6, 16) / 3), nn.Parameter(torch.randn(16))
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        return self.fc(torch.relu(torch.addmm(self.b, x, self.w)))


class Bmm(nn.Module):
    """``bmm(a, bᵀ)`` of two projections: their features are contracted, so q and k are one group."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.fc = nn.Linear(6, 16), nn.Linear(6, 16), nn.Linear(5, 3)

    def forward(self, x):  # x: (batch, tokens=5, 6)
        return self.fc(torch.bmm(self.q(x), self.k(x).transpose(1, 2)))


class BroadcastMatmul(nn.Module):
    """``a[b, n, k] @ W[k, m]``: the parameter's batch dims are broadcast (none), its columns produce."""

    def __init__(self):
        super().__init__()
        self.fc1, self.w, self.fc2 = nn.Linear(6, 16), nn.Parameter(torch.randn(16, 12) / 4), nn.Linear(12, 3)

    def forward(self, x):  # x: (batch, tokens, 6)
        return self.fc2(torch.relu(torch.matmul(torch.relu(self.fc1(x)), self.w)))


class BroadcastEinsum(nn.Module):
    """``einsum("bnk,bkm->bnm")`` with a size-1 ``b`` in the second operand (broadcast)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.w, self.fc2 = nn.Linear(6, 16), nn.Parameter(torch.randn(1, 16, 12) / 4), nn.Linear(12, 3)

    def forward(self, x):
        return self.fc2(torch.einsum("bnk,bkm->bnm", torch.relu(self.fc1(x)), self.w))


class TransposedWeight(nn.Module):
    """``h @ w.T`` (Falcon's spelling of a linear): w's columns contract the hidden features."""

    def __init__(self):
        super().__init__()
        self.fc1, self.w = nn.Linear(6, 16), nn.Parameter(torch.randn(3, 16) / 4)

    def forward(self, x):
        return torch.relu(self.fc1(x)) @ self.w.T


class Functional(nn.Module):
    """``F.linear`` with parameters read by hand."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 16), nn.Linear(16, 3)

    def forward(self, x):
        h = F.linear(x, self.fc1.weight, self.fc1.bias)
        return F.linear(torch.relu(h), self.fc2.weight, self.fc2.bias)


#: case -> (model, input shape, {tensor: (dim, size after pruning half the hidden group)})
CASES = {
    "loose_matmul": (LooseMatmul, (4, 6), {"w": (1, 8), "fc.weight": (1, 8)}),
    "addmm": (Addmm, (4, 6), {"w": (1, 8), "b": (0, 8), "fc.weight": (1, 8)}),
    "bmm": (Bmm, (2, 5, 6), {"q.weight": (0, 8), "k.weight": (0, 8), "q.bias": (0, 8)}),
    "broadcast_matmul": (BroadcastMatmul, (2, 5, 6), {"fc1.weight": (0, 8), "w": (0, 8)}),
    "broadcast_einsum": (BroadcastEinsum, (2, 5, 6), {"fc1.weight": (0, 8), "w": (1, 8)}),
    "transposed_weight": (TransposedWeight, (4, 6), {"fc1.weight": (0, 8), "w": (1, 8)}),
    "functional": (Functional, (4, 6), {"fc1.weight": (0, 8), "fc2.weight": (1, 8)}),
}


#: Spellings that still freeze (strict: each turns into a failure once the gap is closed, so the mark goes)
GAPS = {
    ("transposed_weight", "fx"): "symbolic_trace records `self.w.T` as getattr(w, 'T'), which has no rule",
    ("broadcast_einsum", "export"): "export passes einsum's operands as a list: its contraction can be "
                                    "masked only behind a relayout, so the letter freezes",
}


def _cases() -> list:
    return [pytest.param(case, level, id=f"{level}-{case}",
                         marks=[pytest.mark.xfail(strict=True, reason=GAPS[case, level])] if (case, level) in GAPS
                         else []) for case in sorted(CASES) for level in CAPTURES]


def _build(case: str):
    torch.manual_seed(0)
    cls, shape, _ = CASES[case]
    return cls().eval(), torch.randn(shape)


@pytest.mark.parametrize("case, level", _cases())
def test_matrix_product_prunes_and_verifies(prune_checked, case, level):
    model, x = _build(case)
    report = prune_checked(model, x, level, sparsity=0.5)
    assert report.verify.exact and report.verify.max_abs_error < 1e-5
    params = dict(report.result.graph_module.named_parameters())
    for key, (dim, size) in CASES[case][2].items():
        assert params[key].shape[dim] == size, (key, tuple(params[key].shape))


@pytest.mark.parametrize("case, level", _cases())
def test_hidden_group_members(case, level):
    # the hidden features are one group holding exactly the tensor dims the case names, and nothing of
    # the inputs or outputs
    model, x = _build(case)
    groups = fxprune.analyze(model, x, level).groups
    members = {(m.key, m.dim) for g in groups if g.prunable for m in g.members}
    expected = {(key, dim) for key, (dim, _) in CASES[case][2].items()}
    assert expected <= members
    assert not any(key in ("fc.weight", "fc2.weight") and dim == 0 for key, dim in members)


def test_broadcast_batch_dim_of_size_one_freezes(level):
    # einsum letter b of size 1 in w: a channel broadcast there could not be pruned alone, and w's
    # batch dim carries no group
    model, x = _build("broadcast_einsum")
    groups = fxprune.analyze(model, x, level).groups
    assert not any(m.key == "w" and m.dim == 0 for g in groups if g.prunable for m in g.members)
