"""Shared checks of the pass tests: every pass is pure (its input is left exactly as it was).

Also makes ``pass_nets.py`` (the network several pass tests share), beside this file, importable.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

import pytest
import torch
import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassResult

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _state(gm: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in gm.state_dict().items()}


def _storages(gm: torch.nn.Module) -> set[int]:
    tensors = list(gm.parameters()) + list(gm.buffers())
    return {t.untyped_storage().data_ptr() for t in tensors if t.numel()}


@pytest.fixture
def run_pure() -> Callable[..., PassResult]:
    """Run a pass and assert the promises every pass makes about its input and output."""

    def run(pass_: Callable, gm: fx.GraphModule) -> PassResult:
        state, code = _state(gm), gm.code
        values = [(n.name, id(n.meta.get("val"))) for n in gm.graph.nodes]
        result = pass_(gm)
        assert isinstance(result, PassResult)
        after = gm.state_dict()
        assert gm.code == code, "the pass changed its input's code"
        assert state.keys() == after.keys() and all(torch.equal(state[k], after[k]) for k in state), \
            "the pass changed its input's tensors"
        assert [(n.name, id(n.meta.get("val"))) for n in gm.graph.nodes] == values, \
            "the pass changed its input's graph or traced values"
        assert result.graph_module is not gm
        assert not _storages(result.graph_module) & _storages(gm), "the output shares storage with the input"
        return result

    return run


@pytest.fixture(autouse=True)
def _seeded() -> None:
    torch.manual_seed(0)
