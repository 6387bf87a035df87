"""fxprune.hf budget: ``target={"params": f}`` tries mixes of depth and width, keeps the lowest
calibration loss, records the achieved fraction; an unreachable or unknown budget is a typed error."""
from __future__ import annotations

import pytest
import torch

from fxprune.errors import InvalidOptionError

transformers = pytest.importorskip("transformers")
import fxprune.hf  # noqa: E402  (needs transformers)
from fxprune.hf.budget import mixes  # noqa: E402
from fxprune.testing.hf_models import tiny_model  # noqa: E402

def _llama():
    return tiny_model("llama", layers=4)


def _ids(seed: int) -> torch.Tensor:
    return torch.randint(3, 100, (2, 8), generator=torch.Generator().manual_seed(seed))


def test_the_budget_is_met_by_the_best_mix_tried_and_repairs_its_depth_mixes() -> None:
    model = _llama()
    result = fxprune.hf.prune_with_result(model, (_ids(0),), target={"params": 0.8}, block_repair=True,
                                          calibration=[_ids(1), _ids(2)])
    record = result.model.config.fxprune["budget"]
    assert record["target"] == {"params": 0.8}
    assert abs(record["achieved"] - 0.8) < 0.03
    assert record["achieved"] == round(result.model.num_parameters() / model.num_parameters(), 4)
    assert len(record["tried"]) >= 2
    assert {t["layers"] > 0 for t in record["tried"]} == {True, False}  # width alone, and depth with width
    assert all((t["repairs"] > 0) == (t["layers"] > 0) for t in record["tried"])  # block_repair honoured
    assert result.model.config.fxprune["options"]["block_repair"] is True
    assert min(t["loss"] for t in record["tried"]) == pytest.approx(
        fxprune.hf.budget.next_token_loss(result.model, [(_ids(1),), (_ids(2),)]))


def test_mixes_span_width_only_to_depth_only() -> None:
    found = mixes(_llama(), 0.8)
    assert found[0].layers == 0 and found[0].width > 0
    assert found[-1].layers >= 1


def test_bad_budgets_are_typed_errors() -> None:
    model = _llama()
    with pytest.raises(InvalidOptionError, match="smallest model a mix of depth and width reaches keeps 0.235"):
        fxprune.hf.prune(model, (_ids(0),), target={"params": 0.2})
    with pytest.raises(InvalidOptionError, match="'flops' is not supported"):
        fxprune.hf.prune(model, (_ids(0),), target={"flops": 0.5})
    with pytest.raises(InvalidOptionError, match=r"fraction in \(0, 1\)"):
        fxprune.hf.prune(model, (_ids(0),), target={"params": 1.5})
