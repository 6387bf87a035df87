"""fxprune.hf with data (issue 18): calibration and every data-aware criterion, recover= carried into the
returned PreTrainedModel, bf16 checkpoints, tied embeddings, bad calibration data; tiny random LLaMA
configs (the real SmolLM2 run is benchmarks/bench_llm.py)."""
from __future__ import annotations

import re

import pytest
import torch

import fxprune
from fxprune.errors import CalibrationError, ExampleInputError

transformers = pytest.importorskip("transformers")
import fxprune.hf  # noqa: E402  (needs transformers)

T = transformers
VOCAB = 100
CONFIG = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
              pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=True)
MLP = {"intermediate_size": 0.25}


def _llama(dtype: torch.dtype = torch.float32):
    torch.manual_seed(0)
    return T.LlamaForCausalLM(T.LlamaConfig(**CONFIG)).eval().to(dtype)


def _ids(batch: int, seed: int, length: int = 16) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


CALIBRATION = [_ids(3, seed) for seed in range(4)]  # batches of 3: not a multiple of the example's 2


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _state(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("criterion", ["activation", "wanda", "flap", "taylor", "hessian"])
def test_every_data_criterion_prunes_a_causal_lm(criterion):
    model = _llama()
    pruned = fxprune.hf.prune(model, (_ids(2, 9),), sparsity=MLP, criterion=criterion, calibration=CALIBRATION)
    assert pruned.config.intermediate_size == 48
    assert pruned.config.fxprune["options"]["criterion"] == criterion


def test_recovered_weights_are_the_models():
    """reconstruct runs on the pruned graph; the HF model carries its weights and the bias it fitted
    (LLaMA holds it through config.mlp_bias), and computes what the recovered graph computes."""
    model = _llama()
    before = _state(model)
    out = fxprune.hf.prune_with_result(model, (_ids(2, 9),), sparsity=MLP, criterion="flap",
                                       calibration=CALIBRATION, recover=("reconstruct",))
    report = out.result.recovery[0]
    assert [r.layer for r in report.layers] == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    assert all(r.after < r.before for r in report.layers)
    assert out.model.config.mlp_bias is True
    graph = out.result.graph_module
    assert torch.equal(out.model.model.layers[1].mlp.down_proj.weight,
                       graph.get_parameter("model.layers.1.mlp.down_proj.weight"))
    assert float(out.model.model.layers[1].mlp.down_proj.bias.detach().abs().max()) > 0
    assert float(out.model.model.layers[1].mlp.up_proj.bias.detach().abs().max()) == 0  # the flag's other biases
    assert out.max_abs_error < 1e-4
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the input is untouched


def test_tied_embeddings_stay_tied(tmp_path):
    model = _llama()
    pruned = fxprune.hf.prune(model, (_ids(2, 9),), sparsity=MLP, criterion="wanda", calibration=CALIBRATION,
                              recover=("reconstruct",))
    assert pruned.lm_head.weight is pruned.model.embed_tokens.weight
    assert _params(pruned) < _params(model)
    pruned.save_pretrained(tmp_path)
    loaded = T.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    x = _ids(1, 5, 11)
    assert torch.equal(loaded(x).logits, pruned(x).logits)


def test_bf16_prunes_recovers_and_round_trips(tmp_path):
    """The rebuilt bf16 model equals the pruned bf16 graph within bf16's tolerance, stays bf16 and
    round-trips; its logits are those of the fp32 pipeline to bf16 precision."""
    model = _llama(torch.bfloat16)
    out = fxprune.hf.prune_with_result(model, (_ids(2, 9),), sparsity=MLP, criterion="wanda",
                                       calibration=CALIBRATION, recover=("reconstruct",))
    pruned = out.model
    assert pruned.dtype == torch.bfloat16 and 0 < out.max_abs_error < 0.05
    pruned.save_pretrained(tmp_path)
    loaded = T.LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    x = _ids(2, 5, 12)
    assert torch.equal(loaded(x).logits, pruned(x).logits)
    reference = fxprune.hf.prune(_llama(), (_ids(2, 9),), sparsity=MLP, criterion="wanda",
                                 calibration=CALIBRATION, recover=("reconstruct",))
    assert reference.config.fxprune["groups"] == pruned.config.fxprune["groups"]  # the same units kept
    scale = float(reference(x).logits.detach().abs().max())
    assert float((pruned(x).logits.float() - reference(x).logits).abs().max()) < 0.05 * scale


def _storages(tensors) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in tensors}


@pytest.mark.parametrize("recover", [(), ("reconstruct",)])
def test_the_model_holds_the_pruned_graphs_tensors_not_a_copy(recover):
    """The rebuilt model takes the pruned (or recovered) graph's tensors themselves: one copy of the
    pruned weights in memory, not two (profile_hf_memory.py), and none of the user's."""
    model = _llama(torch.bfloat16)
    before = _state(model)
    out = fxprune.hf.prune_with_result(model, (_ids(2, 9),), sparsity=MLP, criterion="wanda",
                                       calibration=CALIBRATION, recover=recover)
    graph = _storages(out.result.graph_module.state_dict().values())
    copied = {name for name, p in out.model.named_parameters() if p.untyped_storage().data_ptr() not in graph}
    # reconstruct's bias on down_proj comes from the graph; mlp_bias also adds the zero ones it did not fit
    assert copied == ({f"model.layers.{i}.mlp.{p}.bias" for i in (0, 1) for p in ("gate_proj", "up_proj")}
                      if recover else set())
    assert not _storages(out.model.parameters()) & _storages(model.state_dict().values())
    assert out.model.lm_head.weight is out.model.model.embed_tokens.weight
    assert all(p.requires_grad for p in out.model.parameters())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_magnitude_on_a_causal_lm_warns_with_the_measured_figure():
    with pytest.warns(UserWarning, match="multiplied held-out perplexity by"):
        fxprune.hf.prune(_llama(), (_ids(2, 9),), sparsity=MLP)


def test_default_criterion_with_calibration_is_energy():
    pruned = fxprune.hf.prune(_llama(), (_ids(2, 9),), sparsity=MLP, calibration=CALIBRATION)
    assert pruned.config.fxprune["options"]["criterion"] == "energy"


def test_dict_batches_are_read_by_input_ids():
    batches = [{"input_ids": x, "attention_mask": torch.ones_like(x)} for x in CALIBRATION]
    pruned = fxprune.hf.prune(_llama(), (_ids(2, 9),), sparsity=MLP, criterion="wanda", calibration=batches)
    assert pruned.config.intermediate_size == 48


@pytest.mark.parametrize("batch, message", [
    (torch.full((2, 16), VOCAB), r"batch 1: input_ids holds token id 100, outside the model's vocabulary"),
    ({"input_ids": _ids(2, 1), "attention_mask": torch.ones(2, 15)},
     r"batch 1: attention_mask of shape \[2, 15\] does not match input_ids \[2, 16\]"),
    ({"input_ids": _ids(2, 1), "attention_mask": torch.full((2, 16), 2)},
     r"batch 1: attention_mask must hold 0 \(padding\) and 1"),
    ({"input_ids": _ids(2, 1), "attention_mask": torch.zeros(2, 16)},
     r"batch 1: attention_mask marks no real token"),
])
def test_bad_calibration_batches_are_typed_errors_and_leave_the_model(batch, message):
    model = _llama()
    before = _state(model)
    with pytest.raises(CalibrationError, match=message):
        fxprune.hf.prune(model, (_ids(2, 9),), sparsity=MLP, criterion="wanda", calibration=[_ids(2, 0), batch])
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_bf16_model_with_fp32_pixel_values_is_refused():
    torch.manual_seed(0)
    vit = T.ViTForImageClassification(T.ViTConfig(image_size=16, patch_size=4, num_labels=3, hidden_size=32,
                                                  num_hidden_layers=1, num_attention_heads=4,
                                                  intermediate_size=64)).eval().to(torch.bfloat16)
    with pytest.raises(ExampleInputError, match=r"example input 0 is torch.float32, the model torch.bfloat16"):
        fxprune.hf.prune(vit, (torch.randn(2, 3, 16, 16),), sparsity=0.25, criterion="l1")


def test_export_level_prunes_a_hf_decoder_without_use_cache_by_hand():
    """fxprune.prune at the export level passes use_cache=False itself; calibration batches need not be
    a multiple of the example's batch (the graph was traced with a dynamic batch)."""
    model = _llama()
    assert model.config.use_cache
    result = fxprune.prune(model, (_ids(2, 9),), sparsity={"*mlp.up_proj": 0.25}, criterion="wanda",
                           capture="export", calibration=CALIBRATION, recover=("reconstruct",))
    assert result.graph_module(_ids(3, 4))[0].shape == (3, 16, VOCAB)
    assert fxprune.verify(model, result).passed


@pytest.mark.slow
def test_cli_prunes_a_hf_model_with_token_calibration(tmp_path):
    """``fxprune prune hf:DIR --criterion wanda --calibration ids.safetensors``: token ids as 'input'."""
    from safetensors.torch import save_file
    from fxprune.cli import main
    source, out, ids = tmp_path / "tiny", tmp_path / "pruned", tmp_path / "ids.safetensors"
    _llama().save_pretrained(source)
    save_file({"input": torch.cat(CALIBRATION)}, str(ids))
    argv = ["prune", f"hf:{source}", "--input-shape", "2,16", "--sparsity", "0.25", "--criterion", "wanda",
            "--calibration", str(ids), "--calibration-batch-size", "5", "--out", str(out), "--no-progress",
            "--no-chart"]
    assert main(argv) == 0
    loaded = T.LlamaForCausalLM.from_pretrained(out).eval()
    assert loaded.config.fxprune["options"]["criterion"] == "wanda"
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight


def test_a_text_calibration_file_for_a_model_without_a_tokenizer_is_a_typed_error(tmp_path, capsys):
    from fxprune.cli import main
    source, text = tmp_path / "tiny", tmp_path / "notes.txt"
    _llama().save_pretrained(source)  # no tokenizer saved beside it
    text.write_text("Some English text to calibrate on. " * 20)
    argv = ["prune", f"hf:{source}", "--input-shape", "1,8", "--sparsity", "0.25", "--calibration", str(text),
            "--out", str(tmp_path / "pruned"), "--no-progress", "--no-chart"]
    assert main(argv) == 2
    assert re.search(r"bad --calibration '.*notes.txt': a text file is tokenised with the model's tokenizer, "
                     r"and '.*tiny' has none that loads", capsys.readouterr().err)
    assert not (tmp_path / "pruned").exists()


def test_reconstruct_ridge_pulls_toward_the_kept_weights():
    """A large ridge keeps a refitted layer at its kept weights (not at zero): a fit from few
    calibration rows cannot wander far from weights that generalise."""
    model = _llama()
    out = fxprune.hf.prune_with_result(model, (_ids(2, 9),), sparsity=MLP, criterion="wanda",
                                       calibration=CALIBRATION, recover={"reconstruct": {"ridge": 1e6}})
    kept = out.plan.kept_indices["model.layers.0.mlp.down_proj.weight"][1]
    original = model.model.layers[0].mlp.down_proj.weight[:, list(kept)]
    refitted = out.model.model.layers[0].mlp.down_proj.weight
    assert not torch.equal(refitted, original)
    assert float((refitted - original).detach().abs().max()) < 1e-3 * float(original.detach().abs().max())
