"""Repeated blocks analysed once (fxprune.core.repeat): the analysis of a model with n identical decoder
layers, expanded from the analysis of the same class built with three, has the full analysis' groups
(names, sizes, members, frozen units, reasons, exactness), parameters and producers in the same order,
and the same plan."""
from __future__ import annotations

import pytest

transformers = pytest.importorskip("transformers")
from fxprune.core.repeat import repeat_blocks  # noqa: E402
from fxprune.hf import checkpoint  # noqa: E402

T = transformers
DECODER = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=6, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64)
FAMILIES = {"llama": lambda: T.LlamaConfig(**DECODER, architectures=["LlamaForCausalLM"]),
            "qwen2": lambda: T.Qwen2Config(**DECODER, architectures=["Qwen2ForCausalLM"])}


def _groups(analysis):
    return [(g.name, g.size, len(g.frozen_units), g.members, g.reasons, g.exact) for g in analysis.groups]


@pytest.mark.parametrize("family", FAMILIES)
def test_three_layers_expanded_equal_all_layers_analysed(family, tmp_path):
    FAMILIES[family]().save_pretrained(tmp_path)
    model = checkpoint.meta_model(tmp_path)
    assert checkpoint.repeated_prefix(model) == "model.layers."
    full = checkpoint.analyse_structure(model, blocks_once=False)
    once = checkpoint.analyse_structure(model)
    assert type(once).__name__ == "Repeated" and type(full).__name__ == "Analysis"
    assert _groups(once) == _groups(full)
    assert list(once.params) == list(full.params)
    assert [p.key for p in once.producers] == [p.key for p in full.producers]
    assert {k: tuple(once.tensor(k).shape) for k in once.params} == \
        {k: tuple(full.tensor(k).shape) for k in full.params}


def test_three_layers_or_fewer_are_not_expanded():
    with pytest.raises(Exception, match="expands 3 blocks to more"):
        repeat_blocks(None, "model.layers.", 3)
