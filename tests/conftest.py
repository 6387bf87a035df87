"""Shared fixtures: ``level`` runs a test at each capture level, ``prune_checked`` runs every promise of a
prune and snapshots the result; ``--heavy`` runs the tests marked ``heavy`` (skipped by default, so CI
stays within its time budget: a long suite runs a bounded set of cases by default, all of them here)."""
from __future__ import annotations

from typing import Any, Callable

import pytest
import torch

from fxprune.options import CAPTURES
from fxprune.testing.check import CheckReport, check_pruned


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--heavy", action="store_true",
                     help="also run the tests marked heavy (the long tail of the long suites)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--heavy") or "heavy" in (config.getoption("markexpr") or ""):
        return
    skip = pytest.mark.skip(reason="heavy: `pytest --heavy` runs it")
    for item in items:
        if "heavy" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=CAPTURES)
def level(request: pytest.FixtureRequest) -> str:
    """Each capture level in turn: a test that takes ``level`` runs once per level, with ids ``fx`` and
    ``export`` before its other parameters (``test_conv[fx-depthwise]``)::

        def test_prunes(level):
            assert fxprune.prune(Net(), x, 0.5, capture=level).plan.kept_indices
    """
    return request.param


@pytest.fixture
def prune_checked(graph_snapshot) -> Callable[..., CheckReport]:
    """``prune_checked(model, inputs, capture, **options)``: check_pruned + the test's snapshot of the pruned
    graph, named after the test alone (its id already holds the level: ``test_conv[fx-depthwise].fx.txt``)."""

    def run(model: torch.nn.Module, inputs: Any, capture: str, *, snapshot: bool = True,
            **options: Any) -> CheckReport:
        report = check_pruned(model, inputs, capture=capture, **options)
        if snapshot:
            assert report.result.graph_module == graph_snapshot
        return report

    return run
