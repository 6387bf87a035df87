"""fxprune.hf experts: ``sparsity={"num_experts": r}`` removes routed experts with their router rows in
Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE; the result equals the original whose router never picks them,
round-trips and generates; REAP drops an expert that writes nothing; bad requests are typed errors."""
from __future__ import annotations

import pytest
import torch

from fxprune.errors import InvalidOptionError, UnsupportedModelError

transformers = pytest.importorskip("transformers")
import fxprune.hf  # noqa: E402  (needs transformers)
from fxprune.hf.experts import moe_blocks, reference  # noqa: E402
from fxprune.testing.hf_models import EXPERT_FIELDS, VOCAB, tiny_model  # noqa: E402

FAMILIES = EXPERT_FIELDS  # {family: the config field of its expert count} (the table: fxprune.testing.hf_models)


def _model(name: str):
    return tiny_model(name)


def _ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, use_cache=False).logits


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_half_the_experts_go_exactly_and_round_trip(name: str, tmp_path) -> None:
    model, field = _model(name), FAMILIES[name]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calibration = [_ids(2, 8, seed) for seed in range(3)]
    result = fxprune.hf.prune_with_result(model, (_ids(2, 8),), sparsity={field: 0.5}, calibration=calibration)
    pruned = result.model
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the input is untouched
    assert getattr(pruned.config, field) == 2 and list(result.changes.values()) == [(4, 2)]
    assert set(result.changes) <= set(pruned.config.to_dict())  # named as config.json names it
    for path, block in moe_blocks(pruned).items():
        assert block.gate.weight.shape[0] == 2 and block.experts.gate_up_proj.shape[0] == 2
    if name == "qwen2_moe":  # the shared expert stays
        assert pruned.model.layers[0].mlp.shared_expert.gate_proj.weight.shape == (40, 32)
    dropped = {p: tuple(d) for p, d in pruned.config.fxprune["experts"]["dropped"].items()}
    ids = _ids(3, 11, seed=7)  # not a calibration batch: the reference holds on any input
    torch.testing.assert_close(_logits(pruned, ids), _logits(reference(model, dropped), ids), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(_logits(pruned, ids), _logits(model, ids))
    pruned.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path).eval()
    torch.testing.assert_close(_logits(loaded, ids), _logits(pruned, ids), rtol=0, atol=0)
    prompt = _ids(1, 4)
    cached = loaded.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(cached, loaded.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0,
                                               use_cache=False))


def test_reap_drops_an_expert_that_writes_nothing() -> None:
    model = _model("mixtral")
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.experts.down_proj[2].zero_()
    calibration = [_ids(4, 8, seed) for seed in range(3)]
    result = fxprune.hf.prune_with_result(model, (_ids(2, 8),), sparsity={"num_local_experts": 0.25},
                                          calibration=calibration, expert_criterion="reap")
    assert result.model.config.fxprune["experts"]["dropped"] == {f"model.layers.{i}.mlp": [2] for i in range(2)}


@pytest.mark.parametrize("criterion", ["frequency", "weight-norm", "random"])
def test_other_criteria(criterion: str) -> None:
    model = _model("olmoe")
    result = fxprune.hf.prune_with_result(model, (_ids(2, 8),), sparsity={"num_experts": 0.25},
                                          expert_criterion=criterion)
    record = result.model.config.fxprune["experts"]
    assert record["criterion"] == criterion and all(len(d) == 1 for d in record["dropped"].values())


def test_bad_expert_requests_are_typed_errors() -> None:
    model = _model("mixtral")
    with pytest.raises(InvalidOptionError, match="keeps 1 experts, fewer than num_experts_per_tok=2"):
        fxprune.hf.prune(model, (_ids(2, 8),), sparsity={"num_local_experts": 0.75})
    with pytest.raises(InvalidOptionError, match="expert_criterion must be one of .* got 'l1'"):
        fxprune.hf.prune(model, (_ids(2, 8),), sparsity={"num_local_experts": 0.25}, expert_criterion="l1")
    llama = tiny_model("llama")
    with pytest.raises(UnsupportedModelError, match="no mixture-of-experts block"):
        fxprune.hf.prune(llama, (_ids(2, 8),), sparsity={"num_experts": 0.25})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_an_expert_width_the_grouped_matmul_refuses_is_rounded_up(dtype: torch.dtype) -> None:
    """36% of Mixtral's 64 units would keep 41: not a multiple of 16 bytes, which transformers' grouped
    matmul refuses; the width kept is rounded up to one it accepts, and the model runs as the graph."""
    model = _model("mixtral").to(dtype)
    ids = _ids(2, 8)
    pruned = fxprune.hf.prune(model, (ids,), sparsity={"intermediate_size": 0.36})
    align = 16 // dtype.itemsize
    assert pruned.config.intermediate_size % align == 0 and pruned.config.intermediate_size < 64
    assert _logits(pruned, ids).isfinite().all()
