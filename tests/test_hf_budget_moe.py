"""fxprune.hf budget on MoE models and by MACs: ``target={"params"|"active_params"|"macs": f}`` mixes
depth, experts (params only) and MoE width, never keeps fewer experts than top-k, meets the figure it
predicts (counted on the pruned model, and again after a round trip), and refuses what it cannot do."""
from __future__ import annotations

import pytest
import torch

from fxprune.errors import InvalidOptionError

transformers = pytest.importorskip("transformers")
import fxprune.hf  # noqa: E402  (needs transformers)
from fxprune.hf.budget import BUDGET_RECORDS, mixes  # noqa: E402
from fxprune.measure import count_macs  # noqa: E402
from fxprune.testing.hf_models import VOCAB, tiny_model  # noqa: E402


def _ids(seed: int) -> torch.Tensor:
    return torch.randint(3, VOCAB, (2, 8), generator=torch.Generator().manual_seed(seed))


def _figure(model, kind: str) -> float:
    return BUDGET_RECORDS[kind].count(model, (_ids(0),)).at(model.config.num_hidden_layers)


# the shared expert's width moves with the routed experts' (a step of 4 units of 48 and of 40: 0.07 of
# this tiny Qwen2-MoE's parameters, so the nearest mix may be half a step, 0.035, from the budget)
@pytest.mark.parametrize("name, width_fields, tolerance", [
    ("mixtral", {"intermediate_size"}, 0.03),
    ("qwen2_moe", {"moe_intermediate_size", "shared_expert_intermediate_size"}, 0.036)])
def test_parameter_mixes_remove_experts_but_keep_top_k(name: str, width_fields: set, tolerance: float) -> None:
    model = tiny_model(name, layers=4)
    found = mixes(model, 0.7)
    assert any(m.experts > 0 for m in found) and any(m.layers > 0 for m in found)
    assert any(m.experts == 0 and m.layers == 0 for m in found)  # width alone
    for m in found:
        assert m.experts <= 4 - 2  # num_experts_per_tok=2 of 4 stay
        assert abs(m.predicted - 0.7) <= tolerance
        assert set(m.sparsity(_space(model))) <= {"num_hidden_layers", "num_experts", "num_local_experts",
                                                  *width_fields}
    deep = mixes(model, 0.2)  # far down: every expert allowed goes, and most layers
    assert max(m.experts for m in deep) == 2 and all(m.layers <= 3 for m in deep)


def _space(model):
    from fxprune.hf.budget import space_of
    return space_of(model, (_ids(0),), "params")


def test_the_shared_expert_shrinks_by_the_routed_experts_width_share() -> None:
    model = tiny_model("qwen2_moe", layers=2)  # moe_intermediate_size 48, shared_expert_intermediate_size 40
    space = _space(model)
    assert space.tied == ("shared_expert_intermediate_size",)  # intermediate_size: no layer is dense
    assert _space(tiny_model("mixtral", layers=2)).tied == ()
    dense_too = _space(tiny_model("qwen2_moe", layers=2, decoder_sparse_step=2))  # layer 0 dense: intermediate_size
    assert dense_too.tied == ("shared_expert_intermediate_size", "intermediate_size")
    width = next(m for m in mixes(model, 0.8) if not m.layers and not m.experts)
    result = fxprune.hf.prune_with_result(model, (_ids(0),), sparsity=width.sparsity(space), calibration=[_ids(1)])
    kept = round((1 - width.width) * 48)
    assert result.changes == {name: (getattr(model.config, name), units) for name, units in space.widths(kept).items()}
    assert 0 < space.widths(kept)["shared_expert_intermediate_size"] < 40
    assert round(_figure(result.model, "params") / _figure(model, "params"), 4) == width.predicted


def test_the_shared_expert_is_named_by_its_module_when_sizes_agree() -> None:
    # Qwen1.5-MoE-A2.7B's sizes agree (5632 both): the shared expert is not intermediate_size, unread here
    model = tiny_model("qwen2_moe", intermediate_size=40)
    pruned = fxprune.hf.prune_with_result(model, (_ids(0),), sparsity={"shared_expert_intermediate_size": 0.5},
                                          calibration=[_ids(1)])
    assert pruned.changes == {"shared_expert_intermediate_size": (40, 20)}
    assert pruned.model.model.layers[0].mlp.shared_expert.gate_proj.weight.shape == (20, 32)


@pytest.mark.parametrize("kind", ["active_params", "macs"])
def test_active_params_and_macs_are_met_by_depth_and_width(kind: str) -> None:
    found = mixes(tiny_model("mixtral", layers=4), 0.7, kind, (_ids(0),))
    assert all(m.experts == 0 for m in found) and len(found) >= 2
    assert all(abs(m.predicted - 0.7) < 0.03 for m in found)


@pytest.mark.parametrize("name, kind, fraction", [
    ("mixtral", "params", 0.75),
    pytest.param("qwen2_moe", "macs", 0.7, marks=pytest.mark.heavy),  # 11 s each: CI runs the params case
    pytest.param("qwen2_moe", "active_params", 0.8, marks=pytest.mark.heavy)])
def test_the_budget_is_met_and_round_trips(name: str, kind: str, fraction: float, tmp_path) -> None:
    model = tiny_model(name)
    result = fxprune.hf.prune_with_result(model, (_ids(0),), target={kind: fraction}, calibration=[_ids(1)])
    record = result.model.config.fxprune["budget"]
    assert record["target"] == {kind: fraction} and abs(record["achieved"] - fraction) < 0.04
    assert record["achieved"] == round(_figure(result.model, kind) / _figure(model, kind), 4)
    assert all(t["achieved"] == t["predicted"] for t in record["tried"])  # counted from the model: exact
    assert any(t["experts"] > 0 for t in record["tried"]) == (kind == "params")
    result.model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path).eval()
    assert loaded.config.fxprune["budget"] == record
    assert round(_figure(loaded, kind) / _figure(model, kind), 4) == record["achieved"]


def test_macs_count_the_routed_experts_once_per_token() -> None:
    model = tiny_model("mixtral", layers=1)  # 16 tokens, top-2 of 4 experts of 3 x 32 x 64 MACs each
    attention = 16 * (32 * 32 * 2 + 32 * 16 * 2) + 2 * 4 * 8 * 8 * 8 * 2  # q, o, k, v; q·k and p·v per head
    assert count_macs(model, (_ids(0),), {"use_cache": False}) == \
        16 * 2 * 3 * 32 * 64 + 16 * 32 * 4 + attention + 16 * 32 * VOCAB


def test_bad_moe_budgets_are_typed_errors() -> None:
    with pytest.raises(InvalidOptionError, match="target 'active_params': LlamaForCausalLM has no routed experts"):
        fxprune.hf.prune(tiny_model("llama"), (_ids(0),), target={"active_params": 0.8})
    with pytest.raises(InvalidOptionError, match=r"a mix of depth, experts and width reaches keeps 0\.\d+ of the "
                                                 r"params"):
        fxprune.hf.prune(tiny_model("mixtral", layers=4), (_ids(0),), target={"params": 0.05})
    with pytest.raises(InvalidOptionError, match=r"target active_params 0.05 .* a mix of depth and width reaches"):
        fxprune.hf.prune(tiny_model("mixtral", layers=4), (_ids(0),), target={"active_params": 0.05})
    with pytest.raises(InvalidOptionError, match=r"expert_criterion='frequency' has no effect: no mix that meets "
                                                 r"target active_params 0.8 removes experts"):
        fxprune.hf.prune(tiny_model("mixtral", layers=4), (_ids(0),), target={"active_params": 0.8},
                         expert_criterion="frequency", calibration=[_ids(1)])
