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


def test_mixes_are_ranked_on_held_out_sequences_and_the_chosen_one_is_refitted_on_all() -> None:
    """Scored on the data its repair was fitted on, the all-depth mix looked best on SmolLM2 and was the
    worst held out (bench_depth_v4.json): each mix is fitted on 3 of the 4 sequences and scored on the 4th."""
    model, calibration = _llama(), [_ids(1), _ids(2)]
    result = fxprune.hf.prune_with_result(model, (_ids(0),), target={"params": 0.8}, block_repair=True,
                                          calibration=calibration)
    record = result.model.config.fxprune["budget"]
    assert record["scored"].startswith("the mixes' loss on the last 1 calibration sequences, each mix fitted on "
                                       "the other 3")
    chosen = result.request.sparsity
    repair = {"block_repair": True} if "num_hidden_layers" in chosen else {}  # refused where no layer goes
    split = fxprune.hf.budget.split_calibration(calibration)
    assert [len(b["input_ids"]) for b in split.fit.data] == [2, 1] and len(split.held_out.data[0]["input_ids"]) == 1
    fitted_on_part = fxprune.hf.prune(model, (_ids(0),), sparsity=chosen, calibration=split.fit, **repair)
    assert min(t["loss"] for t in record["tried"]) == pytest.approx(
        fxprune.hf.budget.next_token_loss(fitted_on_part, split.held_out))
    fitted_on_all = fxprune.hf.prune(model, (_ids(0),), sparsity=chosen, calibration=calibration,
                                     **repair)
    ids = _ids(3)
    torch.testing.assert_close(result.model(ids).logits, fitted_on_all(ids).logits)
    assert not torch.allclose(fitted_on_part(ids).logits, fitted_on_all(ids).logits)  # the refit changed it


def test_one_calibration_sequence_ranks_the_mixes_in_sample_and_says_so() -> None:
    with pytest.warns(UserWarning, match="one calibration sequence"):
        result = fxprune.hf.prune_with_result(_llama(), (_ids(0),), target={"params": 0.8}, block_repair=True,
                                              calibration=[_ids(1)[:1]])
    assert result.model.config.fxprune["budget"]["scored"].startswith("the mixes' loss on the data they were fitted")


def test_without_fitted_weights_the_mixes_are_ranked_on_all_the_calibration_data() -> None:
    """Ranking units barely overfits, and more sequences rank more surely (the trained MoE's budget chose a
    worse mix on 2 held-out sequences than on all 8): no split where no weight is fitted to the data."""
    calibration = [_ids(1), _ids(2)]
    result = fxprune.hf.prune_with_result(_llama(), (_ids(0),), target={"params": 0.8}, calibration=calibration)
    record = result.model.config.fxprune["budget"]
    assert record["scored"] == "the mixes' loss on the calibration data (no weights fitted to it)"
    assert min(t["loss"] for t in record["tried"]) == pytest.approx(
        fxprune.hf.budget.next_token_loss(result.model, calibration))


def test_the_loss_leaves_out_padded_positions() -> None:
    model, ids = _llama(), _ids(1)
    padded = {"input_ids": torch.cat([ids, torch.zeros(2, 3, dtype=torch.long)], 1),
              "attention_mask": torch.cat([torch.ones(2, 8), torch.zeros(2, 3)], 1).long()}
    loss = fxprune.hf.budget.next_token_loss
    assert loss(model, fxprune.hf.calibrated.token_calibration([padded], 49152)) == pytest.approx(loss(model, [ids]))


def test_a_layer_option_no_mix_can_use_is_refused() -> None:
    with pytest.raises(InvalidOptionError, match=r"block_repair=True has no effect: no mix that meets target "
                                                 r"params 0.98 removes layers"):
        fxprune.hf.prune(_llama(), (_ids(0),), target={"params": 0.98}, block_repair=True, calibration=[_ids(1)])


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
