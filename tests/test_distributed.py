"""Calibration over ``torch.distributed`` ranks: two ``gloo`` processes on the CPU, each holding half
of the batches, give the same statistics, scores and plan as one process on all of them.

The workers are this file run as a script (``python test_distributed.py RANK WORLD STORE OUT``): a
fresh interpreter each, joined through a ``FileStore`` (``init_method="file://..."``).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

CRITERIA = ("activation", "wanda", "flap", "taylor", "hessian")


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv(x)))
        return self.fc(torch.relu(self.conv2(x)).mean((2, 3)))


def _net() -> Net:
    torch.manual_seed(0)
    return Net().eval()


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(3)
    return [(torch.randn(4, 3, 6, 6, generator=gen), torch.randint(0, 4, (4,), generator=gen)) for _ in range(4)]


def _results(batches: list, criteria: tuple = CRITERIA) -> dict:
    """Scores (per criterion and group) and the plan's kept indices (global ranking on standardised
    scores, FLAP's adaptive ratios) for ``batches``."""
    import fxprune
    from fxprune.stages import make_plan
    from fxprune.options import PruneOptions
    from fxprune.data.criteria import gather_evidence, score_groups
    from fxprune.core.select import select
    analysis = fxprune.analyze(_net(), (batches[0][0][:1],), "fx")
    policy = PruneOptions(0.5, global_ranking=True, normalize="standardize")
    out: dict = {"scores": {}, "plans": {}}
    for criterion in criteria:
        evidence = gather_evidence(analysis, criterion, batches, F.cross_entropy)
        scores = score_groups(analysis, analysis.groups, criterion, evidence=evidence)
        out["scores"][criterion] = {k: v.tolist() for k, v in scores.items()}
        plan = make_plan(analysis, select(analysis, scores, policy), PruneOptions())
        out["plans"][criterion] = json.loads(plan.to_json())["kept_indices"]
    return out


def _worker(rank: int, world: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        mine = _batches()[rank::world]  # rank 0: batches 0, 2; rank 1: batches 1, 3
        Path(out).write_text(json.dumps(_results(mine)))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_ranks_equal_one_process_on_all_the_data(tmp_path: Path) -> None:
    world = 2
    outs = [tmp_path / f"rank{r}.json" for r in range(world)]
    workers = [subprocess.Popen([sys.executable, __file__, str(r), str(world), str(tmp_path / "store"),
                                 str(outs[r])], stderr=subprocess.PIPE, text=True) for r in range(world)]
    errors = [w.communicate(timeout=240)[1] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], errors
    ranks = [json.loads(o.read_text()) for o in outs]
    single = _results(_batches())
    assert ranks[0]["plans"] == ranks[1]["plans"] == single["plans"]
    for criterion in CRITERIA:
        for group, scores in single["scores"][criterion].items():
            for rank in ranks:
                torch.testing.assert_close(torch.tensor(rank["scores"][criterion][group], dtype=torch.float64),
                                           torch.tensor(scores, dtype=torch.float64), rtol=1e-6, atol=1e-9)
    halves = [_results(_batches()[r::world], ("wanda",))["scores"]["wanda"] for r in range(world)]
    assert halves[0] != single["scores"]["wanda"] != halves[1]  # each rank alone would score otherwise


if __name__ == "__main__":
    _worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
