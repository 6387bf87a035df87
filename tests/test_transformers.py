"""HuggingFace transformers models prune at the export level (their only route): attention's head
dims are tied across q and k (the scale kept), value dims across v and the output projection, MLP
widths pruned, and the view sizes baked into the graph rewritten — no config patched by hand."""
from __future__ import annotations

import pytest
import torch

import fxprune
from fxprune.check import check_pruned

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


MODELS = {"bert": _bert, "gpt2": _gpt2}


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
    if report.verify.exact:  # GPT-2's residual stream is pruned through LayerNorm: approximate, reported
        assert report.verify.max_abs_error < 1e-4
