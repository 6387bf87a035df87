"""Export-level results are not specialised to the example's sizes: by default the batch (and the
sequence of token inputs) is dynamic, so pruned graphs and saved modules run on other batch sizes and
lengths; ``dynamic_shapes=None`` specialises, a user's spec goes to torch.export, and a spec export rejects
is a typed error naming the dim. An ExportedProgram keeps its own shapes."""
from __future__ import annotations

import sys

import pytest
import torch
import torch.nn as nn

import fxprune
from fxprune.core.capture import default_dynamic_shapes
from fxprune.errors import DynamicShapesError


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        y = torch.relu(self.conv(x)).mean((2, 3))
        return self.fc(y.reshape(y.shape[0], -1))


class _FixedBatch(nn.Module):
    """Reshapes with a literal batch: export must specialise it."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        return self.fc(x).reshape(2, -1)


class _Positions(nn.Module):
    """Token ids plus a learned table of 8 positions: the sequence cannot grow past 8."""

    def __init__(self):
        super().__init__()
        self.tokens = nn.Embedding(20, 6)
        self.positions = nn.Parameter(torch.randn(8, 6))
        self.fc = nn.Linear(6, 4)

    def forward(self, ids):
        return self.fc(self.tokens(ids) + self.positions[: ids.shape[1]])


def test_default_spec_marks_batch_and_token_sequences():
    spec = default_dynamic_shapes((torch.zeros(2, 8, dtype=torch.long), torch.zeros(2, 3, 4, 4),
                                   torch.zeros(5, 8, dtype=torch.long)))
    assert spec[0][0] is spec[1][0] and spec[0][0].__name__ == "batch"  # one batch for equal sizes
    assert spec[0][1].__name__ == "seq" and 1 not in spec[1]
    assert spec[2][0].__name__ == "batch1" and spec[2][1] is spec[0][1]
    assert default_dynamic_shapes((3,)) is None


def test_pruned_graph_and_saved_module_run_on_other_batch_sizes(tmp_path):
    torch.manual_seed(0)
    model, x = _Net().eval(), torch.randn(1, 3, 8, 8)  # batch 1: export's 0/1 rule is avoided
    result = fxprune.prune(model, (x,), sparsity=0.5, capture="export")
    for batch in (1, 3, 5):
        other = torch.randn(batch, 3, 8, 8)
        assert fxprune.verify(model, result, (other,)).passed
    fxprune.save(result, tmp_path)
    sys.path.insert(0, str(tmp_path))
    try:
        import module
        saved = module.load()
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("module", None)
    other = torch.randn(4, 3, 8, 8)
    torch.testing.assert_close(saved(other), result.graph_module(other))


def test_static_when_asked_and_for_a_user_exported_program():
    torch.manual_seed(0)
    model, x = _Net().eval(), torch.randn(2, 3, 8, 8)
    static = fxprune.prune(model, (x,), sparsity=0.5, capture="export", dynamic_shapes=None)
    with pytest.raises(Exception, match="x.size"):
        static.graph_module(torch.randn(3, 3, 8, 8))
    program = torch.export.export(model, (x,))  # the user's own: static
    own = fxprune.prune(program, (x,), sparsity=0.5)
    with pytest.raises(Exception, match="x.size"):
        own.graph_module(torch.randn(3, 3, 8, 8))


def test_a_model_that_specialises_the_batch_warns_by_default_and_errors_when_asked():
    torch.manual_seed(0)
    model, x = _FixedBatch().eval(), torch.randn(2, 6)
    with pytest.warns(UserWarning, match="torch.export rejected a dynamic batch dim"):
        result = fxprune.prune(model, (x,), sparsity=0.5, capture="export")
    assert fxprune.verify(model, result, (x,)).passed
    spec = ({0: torch.export.Dim("rows", min=1)},)
    with pytest.raises(DynamicShapesError, match="rows dim"):
        fxprune.prune(model, (x,), sparsity=0.5, capture="export", dynamic_shapes=spec)


@pytest.mark.slow
def test_torchvision_model_pruned_at_batch_one_runs_at_batch_four():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model, x = torchvision.models.resnet18().eval(), torch.randn(1, 3, 32, 32)
    result = fxprune.prune(model, (x,), sparsity=0.5, capture="export")
    report = fxprune.verify(model, result, (torch.randn(4, 3, 32, 32),))
    assert report.passed and report.exact


def test_a_bounded_sequence_takes_the_range_export_suggests():
    torch.manual_seed(0)
    model, ids = _Positions().eval(), torch.randint(0, 20, (2, 8))
    result = fxprune.prune(model, (ids,), sparsity=0.5, capture="export")  # no warning: seq <= 8
    for shape in ((5, 8), (1, 3)):
        assert fxprune.verify(model, result, (torch.randint(0, 20, shape),)).passed
    with pytest.raises(Exception, match="ids.size"):
        result.graph_module(torch.randint(0, 20, (2, 9)))
