"""fxprune.hf depth: ``sparsity={"num_hidden_layers": r}`` removes whole layers; the config is rewritten
(layer count, per-layer lists, MoE placement) so the model round-trips and generates with a KV cache,
for every family fxprune.hf supports whose layers are ``y = x + f(x)``; BERT's post-norm layers are a
typed error."""
from __future__ import annotations

import pytest
import torch

from fxprune.errors import InvalidOptionError, UnsupportedModelError

transformers = pytest.importorskip("transformers")
import fxprune.hf  # noqa: E402  (needs transformers)
from fxprune.hf.depth import depth_config, renumbered  # noqa: E402
from fxprune.testing.hf_models import VOCAB, tiny_config, tiny_model  # noqa: E402

T = transformers
#: The families whose layers go (the table: fxprune.testing.hf_models), with what each changes there:
#: Qwen2 with sliding attention in layers >= 2 (layer_types and max_window_layers follow the kept
#: layers), Qwen2-MoE with experts in every second layer (decoder_sparse_step is written out as
#: mlp_only_layers). BERT's post-norm layers are refused (test_bad_depth_requests_are_typed_errors).
FAMILIES = {"llama": {}, "qwen2": dict(use_sliding_window=True, max_window_layers=2), "qwen3": {}, "mistral": {},
            "phi3": {}, "gemma2": {}, "gpt2": {}, "vit": {}, "mixtral": {}, "qwen2_moe": dict(decoder_sparse_step=2)}


def _model(name: str):
    return tiny_model(name, layers=4, **FAMILIES[name])


def _inputs(name: str, batch: int, length: int) -> tuple:
    generator = torch.Generator().manual_seed(batch * 100 + length)
    if name == "vit":
        return (torch.randn(batch, 3, 16, 16, generator=generator),)
    return (torch.randint(3, VOCAB, (batch, length), generator=generator),)


def _logits(model, inputs: tuple) -> torch.Tensor:
    with torch.no_grad():
        return model(*inputs, **({} if inputs[0].is_floating_point() else {"use_cache": False})).logits


def _kinds(model) -> list[str]:
    """Each layer's kind, as the layers themselves report it (attention type, sparse or dense MLP)."""
    layers = fxprune.hf.depth.layer_list(model)[0]
    return [f"{getattr(l, 'attention_type', '')}:{type(getattr(l, 'mlp', l)).__name__}"
            for l in model.get_submodule(layers)]


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_half_the_layers_go_and_the_model_round_trips(name: str, tmp_path) -> None:
    model = _model(name)
    calibration = [_inputs(name, 2, 8)[0] for _ in range(2)]
    result = fxprune.hf.prune_with_result(model, _inputs(name, 2, 8), sparsity={"num_hidden_layers": 0.5},
                                          calibration=calibration)
    pruned = result.model
    assert type(pruned) is type(model) and pruned.config.num_hidden_layers == 2
    kept = [i for i in range(4) if i not in result.depth.dropped]
    assert _kinds(pruned) == [_kinds(model)[i] for i in kept]  # each kept layer is built as it was
    assert pruned.config.fxprune["depth"]["dropped"] == list(result.depth.dropped)
    for batch, length in ((1, 5), (3, 11)):  # HF's forward equals the pruned graph's at other shapes
        inputs = _inputs(name, batch, length)
        torch.testing.assert_close(_logits(pruned, inputs), result.depth.graph_module(*inputs).logits,
                                   rtol=1e-4, atol=1e-5)
    pruned.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path).eval()
    assert loaded.config.num_hidden_layers == 2 and _kinds(loaded) == _kinds(pruned)
    inputs = _inputs(name, 3, 11)
    torch.testing.assert_close(_logits(loaded, inputs), _logits(pruned, inputs), rtol=0, atol=0)
    if name != "vit":  # the KV cache is indexed by the renumbered layer_idx
        prompt = _inputs(name, 1, 4)[0]
        cached = loaded.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
        uncached = loaded.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0, use_cache=False)
        assert cached.shape == (1, 10) and torch.equal(cached, uncached)


def test_depth_and_width_in_one_call() -> None:
    model = _model("llama")
    result = fxprune.hf.prune_with_result(model, _inputs("llama", 2, 8),
                                          sparsity={"num_hidden_layers": 0.25, "intermediate_size": 0.5})
    assert result.model.config.num_hidden_layers == 3 and result.model.config.intermediate_size == 32
    assert result.changes["num_hidden_layers"] == (4, 3)
    assert result.model.config.fxprune["changes"]["intermediate_size"] == [64, 32]
    inputs = _inputs("llama", 2, 9)
    torch.testing.assert_close(_logits(result.model, inputs), result.result.graph_module(*inputs).logits,
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("criterion", ["angular", "sleb"])
def test_block_criteria_and_repair(criterion: str) -> None:
    model = _model("llama")
    calibration = [_inputs("llama", 4, 8)[0] for _ in range(2)]
    kwargs = dict(sparsity={"num_hidden_layers": 0.5}, calibration=calibration, block_criterion=criterion)
    plain = fxprune.hf.prune_with_result(model, _inputs("llama", 2, 8), **kwargs)
    repaired = fxprune.hf.prune_with_result(model, _inputs("llama", 2, 8), block_repair=True, **kwargs)
    assert plain.depth.record["criterion"] == criterion
    dropped = plain.depth.dropped
    if criterion == "angular":
        assert dropped[1] - dropped[0] == 1
    assert repaired.depth.dropped == dropped
    assert repaired.depth.record["repairs"] and plain.depth.record["repairs"] == []
    before = dropped[0] - 1
    if before >= 0:  # the layer before the first removed run writes what the run wrote
        key = f"model.layers.{before}.mlp.down_proj.weight"
        assert not torch.equal(plain.model.state_dict()[key], repaired.model.state_dict()[key])


def test_the_sequential_repair_refits_every_kept_layer_after_the_first_removed() -> None:
    model = _model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calibration = [_inputs("llama", 4, 8)[0] for _ in range(2)]
    kwargs = dict(sparsity={"num_hidden_layers": 0.25}, calibration=calibration)
    walked = fxprune.hf.prune_with_result(model, _inputs("llama", 2, 8), block_repair="sequential", **kwargs)
    [dropped] = walked.depth.dropped
    assert walked.depth.record["repair"] == "sequential"
    refitted = [line.split(": ")[1].split(" ")[0] for line in walked.depth.record["repairs"]]
    kept_after = [i for i in range(max(dropped - 1, 0), 4) if i != dropped]
    assert refitted == [f"model.layers.{i}.mlp.down_proj.weight" for i in kept_after]
    # the rebuilt model holds the refitted tensors: its last layer's MLP output is no longer the original's
    last = kept_after[-1]
    new_key = f"model.layers.{last - (dropped < last)}.mlp.down_proj.weight"
    assert not torch.equal(walked.model.state_dict()[new_key], before[f"model.layers.{last}.mlp.down_proj.weight"])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the input is untouched


def test_config_rewrite_renumbers_per_layer_fields() -> None:
    config = tiny_config("qwen2_moe", layers=6, decoder_sparse_step=2, mlp_only_layers=[3])
    new, changes = depth_config(config, [0, 1, 3, 5])
    assert new.num_hidden_layers == 4 and changes["num_hidden_layers"] == (6, 4)
    # sparse were 1 and 5 (step 2; 3 listed dense): dense are old 0, 3 -> new 0, 2
    assert new.decoder_sparse_step == 1 and new.mlp_only_layers == [0, 2]
    assert renumbered("model.layers.5.mlp.gate.weight", "model.layers", (2, 4)) == "model.layers.3.mlp.gate.weight"
    assert renumbered("model.layers.2.mlp.gate.weight", "model.layers", (2, 4)) is None
    assert renumbered("lm_head.weight", "model.layers", (2, 4)) == "lm_head.weight"


def test_bad_depth_requests_are_typed_errors() -> None:
    bert = tiny_model("bert", layers=4)
    with pytest.raises(UnsupportedModelError, match="post-norm"):
        fxprune.hf.prune(bert, _inputs("bert", 2, 8), sparsity={"num_hidden_layers": 0.5})
    llama = _model("llama")
    with pytest.raises(InvalidOptionError, match="cannot remove 4 of the 4"):
        fxprune.hf.prune(llama, _inputs("llama", 2, 8), sparsity={"num_hidden_layers": 0.99})
    with pytest.raises(InvalidOptionError, match="block_criterion must be one of .* got 'l1'"):
        fxprune.hf.prune(llama, _inputs("llama", 2, 8), sparsity={"num_hidden_layers": 0.5}, block_criterion="l1")


@pytest.mark.parametrize("sparsity", [{"num_hidden_layers": 0.5}, {"intermediate_size": 0.5}])
def test_tied_embeddings_stay_tied(sparsity) -> None:
    model = tiny_model("llama", layers=4, tie_word_embeddings=True)
    pruned = fxprune.hf.prune(model, _inputs("llama", 2, 8), sparsity=sparsity)
    assert pruned.lm_head.weight is pruned.model.embed_tokens.weight
    untied = sum(p.numel() for n, p in pruned.named_parameters(remove_duplicate=False))
    assert pruned.num_parameters() == untied - pruned.lm_head.weight.numel()
