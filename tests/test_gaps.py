"""No silent gaps: every tensor a graph reads is in a group or listed in the plan with its reason.

Over the HuggingFace set (tiny random configs, export level, analysis only): each parameter and buffer
the exported graph reads is a group member or in ``fxprune.core.ungrouped.ungrouped`` with a reason; no weight
matrix is left in no group (Falcon's ``x @ self.weight.T`` and the MoE experts were); and no tensor has
a dim whose channels reach the graph with no producer (the dim-level gap). The torchvision zoo gets the
same assertion inside ``tests/zoo/test_zoo.py``'s own runs.
"""
from __future__ import annotations

import json

import pytest
import torch

import fxprune
from fxprune.cli import main
from fxprune.errors import UnsafeFileError
from fxprune.core.ungrouped import DEAD, DIM_GAP, silent_gaps, ungrouped
from fxprune.core.rules import linear as linear_rules

transformers = pytest.importorskip("transformers")

TOKENS = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
DECODER = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
               num_key_value_heads=1, max_position_embeddings=16, use_cache=False)


def _decoder(config_cls: str, model_cls: str, **extra):
    return lambda: getattr(transformers, model_cls)(getattr(transformers, config_cls)(**{**DECODER, **extra}))


def _gpt2():
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2,
                                                                n_positions=16, use_cache=False))


def _neox():
    return transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=16, use_cache=False))


def _opt():
    return transformers.OPTForCausalLM(transformers.OPTConfig(
        vocab_size=64, hidden_size=16, ffn_dim=32, num_hidden_layers=1, num_attention_heads=2,
        word_embed_proj_dim=16, max_position_embeddings=16, use_cache=False))


def _falcon():
    return transformers.FalconForCausalLM(transformers.FalconConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, use_cache=False))


def _encoder(config_cls: str, model_cls: str, **extra):
    base = dict(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                max_position_embeddings=16)
    return lambda: getattr(transformers, model_cls)(getattr(transformers, config_cls)(**{**base, **extra}))


def _distilbert():
    return transformers.DistilBertModel(transformers.DistilBertConfig(
        vocab_size=64, dim=16, n_layers=1, n_heads=2, hidden_dim=32, max_position_embeddings=16))


def _vit():
    config = transformers.ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                                    image_size=16, patch_size=8)
    return transformers.ViTModel(config), (torch.randn(1, 3, 16, 16),)


def _clip_text():
    return transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=16))


def _t5_encoder():
    return transformers.T5EncoderModel(transformers.T5Config(vocab_size=64, d_model=16, d_kv=8, d_ff=32,
                                                             num_layers=1, num_heads=2))


def _whisper_encoder():
    config = transformers.WhisperConfig(vocab_size=64, d_model=16, encoder_layers=1, encoder_attention_heads=2,
                                        decoder_layers=1, decoder_attention_heads=2, encoder_ffn_dim=32,
                                        decoder_ffn_dim=32, num_mel_bins=8, max_source_positions=8,
                                        pad_token_id=0, bos_token_id=0, eos_token_id=0, decoder_start_token_id=0)
    return transformers.WhisperModel(config).get_encoder(), (torch.randn(1, 8, 16),)


def _wav2vec2():
    config = transformers.Wav2Vec2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                         intermediate_size=32, conv_dim=(8, 8), conv_stride=(5, 2),
                                         conv_kernel=(10, 3), num_conv_pos_embeddings=4,
                                         num_conv_pos_embedding_groups=2)
    return transformers.Wav2Vec2Model(config), (torch.randn(1, 200),)


MOE = dict(num_experts_per_tok=2)
HF = {
    "llama": _decoder("LlamaConfig", "LlamaForCausalLM"),
    "qwen2": _decoder("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": _decoder("Qwen3Config", "Qwen3ForCausalLM", head_dim=8),
    "mistral": _decoder("MistralConfig", "MistralForCausalLM"),
    "phi3": _decoder("Phi3Config", "Phi3ForCausalLM", pad_token_id=0),
    "gemma2": _decoder("Gemma2Config", "Gemma2ForCausalLM", head_dim=8),
    "gemma3": _decoder("Gemma3TextConfig", "Gemma3ForCausalLM", head_dim=8),
    "gpt2": _gpt2,
    "gpt_neox": _neox,
    "opt": _opt,
    "falcon": _falcon,
    "bert": _encoder("BertConfig", "BertModel"),
    "roberta": _encoder("RobertaConfig", "RobertaModel", max_position_embeddings=20, pad_token_id=1),
    "distilbert": _distilbert,
    "vit": _vit,
    "clip_text": _clip_text,
    "t5_encoder": _t5_encoder,
    "whisper_encoder": _whisper_encoder,
    "wav2vec2": _wav2vec2,
    "mixtral": _decoder("MixtralConfig", "MixtralForCausalLM", num_local_experts=4, **MOE),
    "qwen2_moe": _decoder("Qwen2MoeConfig", "Qwen2MoeForCausalLM", moe_intermediate_size=24, num_experts=4,
                          shared_expert_intermediate_size=24, **MOE),
}


def _build(name: str):
    torch.manual_seed(0)
    built = HF[name]()
    model, inputs = built if isinstance(built, tuple) else (built, (TOKENS,))
    return model.eval(), inputs


def _read_by_graph(gm: torch.fx.GraphModule) -> set[str]:
    """Every parameter and buffer the export-level graph reads (its get_attr targets)."""
    tensors = dict(gm.named_parameters(remove_duplicate=False)) | dict(gm.named_buffers(remove_duplicate=False))
    return {str(n.target) for n in gm.graph.nodes if n.op == "get_attr" and str(n.target) in tensors}


#: Groups that were gaps before (Falcon's ``x @ self.weight.T``; the stacked MoE experts): {group: units}.
NOW_GROUPS = {
    "falcon": {"transformer.h.0.mlp.dense_h_to_4h": 64, "transformer.h.0.self_attention.query_key_value": 4},
    "mixtral": {"model.layers.0.mlp.experts": 32},
    "qwen2_moe": {"model.layers.0.mlp.experts": 24},
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(HF))
def test_every_tensor_is_in_a_group_or_listed_with_its_reason(name):
    model, inputs = _build(name)
    analysis = fxprune.analyze(model, inputs, "export")
    prunable = {g.name: g.size for g in analysis.groups if g.prunable}
    assert {k: prunable.get(k) for k in NOW_GROUPS.get(name, {})} == NOW_GROUPS.get(name, {})
    listed = ungrouped(analysis)
    grouped = {analysis.canonical(m.key) for g in analysis.groups for m in g.members}
    read = {analysis.canonical(k) for k in _read_by_graph(analysis.gm)}
    assert read, "the graph reads no tensor: the test would be vacuous"
    assert read <= grouped | set(listed), f"neither grouped nor listed: {sorted(read - grouped - set(listed))}"
    assert all(reason for reason in listed.values())
    matrices = {k: listed[k] for k in read - grouped if analysis.tensor(k).dim() >= 2 and
                isinstance(analysis.tensor(k), torch.nn.Parameter)}
    vague = {k: r for k, r in matrices.items() if not r.startswith("frozen: ")}
    assert not vague, f"weights in no group, not frozen by a named op: {vague}"
    dim_gaps = {k: r for k, r in listed.items() if DIM_GAP in r}
    assert not dim_gaps, f"dims whose channels no group holds: {dim_gaps}"
    assert silent_gaps(analysis) == {}  # what the zoo test asserts, here on the HF set


def test_a_dim_no_producer_opens_is_listed(monkeypatch):
    # Falcon's x @ self.weight.T before rules.linear saw through the transpose: the MLP and qkv widths
    # reach the graph but no group holds them; the accounting lists each such weight with the dim
    monkeypatch.setattr(linear_rules, "SEE_THROUGH", tuple(s for s in linear_rules.SEE_THROUGH
                                                           if s is not torch.ops.aten.numpy_T))
    analysis = fxprune.analyze(*_build("falcon"), "export")
    gaps = silent_gaps(analysis)
    assert {"transformer.h.0.mlp.dense_h_to_4h.weight", "transformer.h.0.mlp.dense_4h_to_h.weight",
            "transformer.h.0.self_attention.query_key_value.weight"} <= set(gaps)
    assert gaps["transformer.h.0.mlp.dense_h_to_4h.weight"].startswith("dim 0: ")


def test_the_plan_lists_the_ungrouped_tensors_and_keeps_them_through_json():
    model, inputs = _build("llama")
    result = fxprune.prune(model, inputs, sparsity=0.5, capture="export")
    assert result.plan.ungrouped == ungrouped(result.analysis)
    assert fxprune.Plan.from_json(result.plan.to_json()) == result.plan
    text = str(result.plan)
    assert "in no group" in text and all(name in text for name in list(result.plan.ungrouped)[:1])


def test_an_ungrouped_entry_outside_the_schema_is_refused():
    plan = fxprune.Plan({}, {}, ungrouped={"bn.num_batches_tracked": "a scalar"})
    assert fxprune.Plan.from_json(plan.to_json()) == plan
    data = json.loads(plan.to_json())
    for bad in ({"bn.num_batches_tracked": 1}, ["bn.num_batches_tracked"], {"x": None}):
        with pytest.raises(UnsafeFileError, match="ungrouped|JSON object"):
            fxprune.Plan.from_json(json.dumps({**data, "ungrouped": bad}))


FACTORY = """
import torch
from torch import nn

def small():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4))
"""


def test_the_cli_summary_and_plan_list_the_ungrouped_tensors(tmp_path, monkeypatch, capsys):
    (tmp_path / "gap_models.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "pruned"
    assert main(["prune", "gap_models:small", "--input-shape", "1,3,8,8", "--criterion", "l1", "--no-chart",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    line = "1 tensors in no group (kept as they are):\n  1 x a scalar: 1.num_batches_tracked"
    assert line in printed and line in (out / "summary.md").read_text()
    assert json.loads((out / "plan.json").read_text())["ungrouped"] == {"1.num_batches_tracked": "a scalar"}


class _WithDeadHead(torch.nn.Module):
    """An eval-mode model whose auxiliary head forward never calls (GoogLeNet's aux1/aux2)."""

    def __init__(self):
        super().__init__()
        self.body, self.aux = torch.nn.Linear(4, 8), torch.nn.Linear(8, 3)

    def forward(self, x):
        return self.body(x)


def test_a_weight_read_by_no_node_is_listed_as_dead_not_a_gap():
    analysis = fxprune.analyze(_WithDeadHead().eval(), (torch.randn(2, 4),), "export")
    listed = ungrouped(analysis)
    assert "aux.weight" in _read_by_graph(analysis.gm)  # export keeps a get_attr for every parameter
    assert listed["aux.weight"] == DEAD and silent_gaps(analysis) == {}
