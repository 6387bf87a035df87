"""``global_ranking=True`` with a ``{pattern: ratio}`` mapping: the matched groups share the drops the
mapping asks for (ranked together), unmatched groups keep every unit. It used to prune nothing."""
from __future__ import annotations

import torch
import torch.nn as nn

from fxprune.testing.check import check_pruned


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16),
                          nn.ReLU(), nn.Linear(16, 4)).eval()
    with torch.no_grad():  # 12 of layer 2's rows are far below its mean: a global ranking drops them first
        model[2].weight[:12].mul_(0.01)
    return model


def test_global_ranking_with_a_mapping_drops_the_mappings_total():
    report = check_pruned(_mlp(), (torch.randn(2, 8),), sparsity={"0": 0.25, "2": 0.5}, global_ranking=True)
    kept = {g.name: (g.size, g.kept) for g in report.result.plan.groups}
    dropped = {name: size - k for name, (size, k) in kept.items()}
    assert dropped["0"] + dropped["2"] == 4 + 8  # floor(0.25 * 16) + floor(0.5 * 16)
    assert dropped["4"] == 0  # not in the mapping
    assert dropped["2"] > 8  # ranked together: the weak layer loses more than its own ratio
    assert report.verify.exact and report.verify.passed


def test_global_ranking_with_a_mapping_matches_the_uniform_total_when_ratios_agree():
    uniform = check_pruned(_mlp(), (torch.randn(2, 8),), sparsity=0.5, global_ranking=True, deterministic=False)
    mapped = check_pruned(_mlp(), (torch.randn(2, 8),), sparsity={"*": 0.5}, global_ranking=True,
                          deterministic=False)
    assert uniform.result.plan.kept_indices == mapped.result.plan.kept_indices
