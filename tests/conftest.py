"""Shared fixtures: ``prune_checked`` runs every promise of a prune and snapshots the result."""
from __future__ import annotations

from typing import Any, Callable

import pytest
import torch

from fxprune.testing.check import CheckReport, check_pruned

LEVELS = ("fx", "export")


@pytest.fixture
def prune_checked(graph_snapshot) -> Callable[..., CheckReport]:
    """``prune_checked(model, inputs, capture, **options)``: check_pruned + a snapshot per level."""

    def run(model: torch.nn.Module, inputs: Any, capture: str, *, snapshot: bool = True,
            **options: Any) -> CheckReport:
        report = check_pruned(model, inputs, capture=capture, **options)
        if snapshot:
            assert report.result.graph_module == graph_snapshot(name=capture)
        return report

    return run
