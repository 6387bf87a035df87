"""HuggingFace transformers models prune at the export level (their only route): attention's head
dims are tied across q and k (the scale kept), value dims across v and the output projection, MLP
widths pruned, and the view sizes baked into the graph rewritten — no config patched by hand."""
from __future__ import annotations

import pytest
import torch

import fxprune
from fxprune.testing.check import check_pruned

transformers = pytest.importorskip("transformers")


def _bert():
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=64,
                                     max_position_embeddings=16)
    return transformers.BertModel(config).eval()


def _gpt2():
    config = transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=16,
                                     bos_token_id=0, eos_token_id=0, use_cache=False)
    return transformers.GPT2LMHeadModel(config).eval()


def _llama(kv_heads: int = 2):
    """Rotary embeddings, RMSNorm, a gated SiLU MLP and grouped-query attention (2 kv heads for 4)."""
    config = transformers.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=kv_heads, max_position_embeddings=16,
                                      use_cache=False)
    return transformers.LlamaForCausalLM(config).eval()


MODELS = {"bert": _bert, "gpt2": _gpt2, "llama": _llama}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(MODELS))
def test_transformers_model_prunes_at_export_level(name):
    torch.manual_seed(0)
    model = MODELS[name]()
    ids = torch.randint(0, 100, (2, 8))
    report = check_pruned(model, (ids,), capture="export", sparsity=0.5)
    assert report.params_after < report.params_before
    pruned = {g.name: (g.size, g.kept) for g in report.result.plan.groups}
    assert any(size > kept for size, kept in pruned.values())
    # GPT-2's and BERT's residual streams are pruned through LayerNorm, LLaMA's through RMSNorm: the
    # reference computes their statistics over the kept channels, and the pruned model must equal it
    assert report.verify.passed and report.verify.max_abs_error < 1e-4


@pytest.mark.slow
def test_llama_prunes_rotary_pairs_and_mlp_exactly():
    # q and k of every layer share the rotary frequencies (one inv_freq buffer): a unit is one frequency,
    # i.e. the pair (i, i + d/2) of every q and k head; v/o head dims and the gated MLP prune per layer
    torch.manual_seed(0)
    # the residual stream kept whole (it prunes through every RMSNorm, approximately: test_hf.py)
    report = check_pruned(_llama(), (torch.randint(0, 100, (2, 8)),), capture="export", sparsity=0.5,
                          ignore=["model.embed_tokens"])
    assert report.verify.exact and report.verify.max_abs_error < 1e-4
    gm = report.result.graph_module
    assert gm.get_buffer("model.rotary_emb.inv_freq").shape == (2,)
    assert gm.get_parameter("model.layers.1.self_attn.q_proj.weight").shape == (16, 32)  # 4 heads x 4
    assert gm.get_parameter("model.layers.1.self_attn.k_proj.weight").shape == (8, 32)  # 2 kv heads x 4
    assert gm.get_parameter("model.layers.0.mlp.gate_proj.weight").shape == (32, 32)
