"""fxprune.hf: a PreTrainedModel in, a PreTrainedModel of the same class out, for eleven families (tiny
random configs, offline; Mixtral and Qwen2-MoE with their experts). Each pruned model computes what the pruned graph computes at other batch sizes
and sequence lengths than the example, round-trips through save_pretrained / from_pretrained with equal
logits, and (decoders) generates; its config holds the plan (one width per kind, whole heads, GQA's
ratio, head_dim unchanged)."""
from __future__ import annotations

import functools

import pytest
import torch

import fxprune
from fxprune.errors import ConfigMismatchError, DynamicShapesError, UnsupportedModelError

transformers = pytest.importorskip("transformers")
import fxprune.hf  # noqa: E402  (needs transformers)
from fxprune.testing.hf_models import VOCAB, tiny_config, tiny_model  # noqa: E402

T = transformers
#: The families pruned by width here (the table: fxprune.testing.hf_models); Mixtral's and Qwen2-MoE's
#: routed experts are 3-D parameters (fxprune/core/rules/moe.py): one intermediate width for all experts.
FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "phi3", "gemma2", "gpt2", "bert", "vit", "mixtral", "qwen2_moe")
DECODERS = {"llama", "qwen2", "qwen3", "mistral", "phi3", "gemma2", "gpt2", "mixtral", "qwen2_moe"}
#: The experts' widths the config records (every expert keeps the same intermediate indices).
EXPERT_WIDTHS = {"mixtral": {"intermediate_size": (64, 32)},
                 "qwen2_moe": {"moe_intermediate_size": (48, 24), "shared_expert_intermediate_size": (40, 20)}}
#: Families whose residual stream prunes (through LayerNorm, RMSNorm or an RMS norm written out); with
#: head_dim derived from hidden_size / num_attention_heads, hidden_size follows the kept heads. Gemma
#: scales its embeddings by sqrt(hidden_size), so its hidden size stays (test_gemma_keeps_hidden_size).
HIDDEN_PRUNES = set(FAMILIES) - {"gemma2"}


def _model(name: str):
    return tiny_model(name)


@functools.lru_cache(maxsize=None)
def _pruned(name: str):
    """A family's model and its default prune (shared by the tests that read it: each prune exports)."""
    model = _model(name)
    return model, fxprune.hf.prune_with_result(model, _inputs(name, 2, 8), sparsity=0.5)


def _inputs(name: str, batch: int, length: int) -> tuple:
    generator = torch.Generator().manual_seed(batch * 100 + length)
    if name == "vit":
        return (torch.randn(batch, 3, 16, 16, generator=generator),)
    return (torch.randint(3, VOCAB, (batch, length), generator=generator),)


def _logits(model, inputs: tuple) -> torch.Tensor:
    with torch.no_grad():
        out = model(*inputs, **({"use_cache": False} if "use_cache" in model.forward.__code__.co_varnames
                                else {}))
    return out.logits


def _config_counts(config) -> dict:
    fields = ("hidden_size", "intermediate_size", "n_inner", "num_attention_heads", "num_key_value_heads")
    return {f: getattr(config, f, None) for f in fields}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_family_round_trips(name, tmp_path):
    model, result = _pruned(name)
    pruned = result.model
    assert type(pruned) is type(model)
    fresh = _model(name).state_dict()  # the same seed: the input was not touched
    assert all(torch.equal(fresh[k], v) for k, v in model.state_dict().items())
    assert pruned.num_parameters() < model.num_parameters()
    old, new = _config_counts(model.config), _config_counts(pruned.config)
    assert EXPERT_WIDTHS.get(name, {}).items() <= dict(result.changes).items()
    assert new["num_attention_heads"] == old["num_attention_heads"] // 2
    if name in HIDDEN_PRUNES:
        assert new["hidden_size"] == old["hidden_size"] // 2
    if old["num_key_value_heads"] is not None:
        assert new["num_key_value_heads"] == old["num_key_value_heads"] // 2  # GQA ratio 2 kept
        assert pruned.config.head_dim == 8  # written where the config would derive it (Qwen2, Phi-3)
    # other batch sizes and lengths than the example: HF's forward equals the pruned graph's
    for batch, length in ((1, 5), (3, 11)):
        inputs = _inputs(name, batch, length)
        graph_logits = result.result.graph_module(*inputs).logits
        torch.testing.assert_close(_logits(pruned, inputs), graph_logits, rtol=1e-4, atol=1e-5)
    pruned.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path).eval()
    assert _config_counts(loaded.config) == new
    assert loaded.config.fxprune["changes"] == pruned.config.fxprune["changes"]
    inputs = _inputs(name, 3, 11)
    torch.testing.assert_close(_logits(loaded, inputs), _logits(pruned, inputs), rtol=0, atol=0)
    if name in DECODERS:
        prompt = _inputs(name, 1, 4)[0]
        generated = loaded.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert generated.shape == (1, 8) and torch.equal(generated[:, :4], prompt)
        again = pruned.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert torch.equal(generated, again)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama", "qwen2", "mixtral"])
def test_a_ratio_that_keeps_every_head_prunes_the_hidden_size_by_whole_heads(name, tmp_path):
    """0.3 keeps both key/value groups and prunes hidden_size: LLaMA's config refuses a hidden size that
    is not a multiple of the heads (32 -> 23 was refused), and Qwen2/Mixtral derive head_dim from
    hidden_size / num_attention_heads unless it is written (q_proj came out 20 rows where 32 were kept)."""
    model = _model(name)
    pruned = fxprune.hf.prune(model, _inputs(name, 2, 8), sparsity=0.3)
    config = pruned.config
    assert (config.hidden_size, config.num_attention_heads, config.head_dim) == (24, 4, 8)
    pruned.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path).eval()
    inputs = _inputs(name, 3, 11)
    torch.testing.assert_close(_logits(loaded, inputs), _logits(pruned, inputs), rtol=0, atol=0)


def test_llama_policy_keeps_whole_heads_and_rotary():
    model, result = _pruned("llama")
    state = result.model.state_dict()
    # 1 of 2 kv heads, with its 2 query heads (the GQA ratio); head_dim 8 and rotary frequencies kept;
    # the residual stream 16 of 32 wide through every RMSNorm (LLaMA writes its norm out by hand)
    assert state["model.layers.0.self_attn.q_proj.weight"].shape == (16, 16)
    assert state["model.layers.0.self_attn.k_proj.weight"].shape == (8, 16)
    assert state["model.layers.0.self_attn.o_proj.weight"].shape == (16, 16)
    assert state["model.layers.1.mlp.down_proj.weight"].shape == (16, 32)
    assert state["model.norm.weight"].shape == (16,) and state["lm_head.weight"].shape == (VOCAB, 16)
    assert torch.equal(result.model.model.rotary_emb.inv_freq, model.model.rotary_emb.inv_freq)
    kept = result.plan.kept_indices["model.layers.0.self_attn.k_proj.weight"][0]
    assert kept in (tuple(range(8)), tuple(range(8, 16)))  # one whole kv head
    notes = result.plan.options.hf["constraints"]
    assert "whole heads, head_dim and rotary frequencies unchanged" in notes["model.layers.0.self_attn.q_proj"]
    assert "a config holds one intermediate_size" in notes["model.layers.0.mlp.gate_proj"]
    assert "a config holds one hidden_size" in notes["model.embed_tokens"]


@pytest.mark.slow
def test_gemma_keeps_hidden_size():
    # Gemma multiplies its embeddings by sqrt(hidden_size): a smaller hidden_size in the config would
    # change that number, so the residual stream stays whole and the plan says why
    model, result = _pruned("gemma2")
    assert result.model.config.hidden_size == model.config.hidden_size
    assert result.model.config.intermediate_size == model.config.intermediate_size // 2
    reason = result.plan.options.hf["constraints"]["model.embed_tokens"]
    assert "reads hidden_size as a number" in reason and "Gemma2ForCausalLM" in reason


@pytest.mark.slow
def test_per_layer_ratios_become_one_width_or_a_typed_error():
    model = _model("llama")
    inputs = _inputs("llama", 2, 8)
    ratios = {"model.layers.0.mlp.*": 0.5}  # layer 0 asks for 32 of 64, layer 1 for all 64
    pruned = fxprune.hf.prune(model, inputs, sparsity=ratios)
    assert pruned.config.intermediate_size == 48  # the mean of the widths asked, in every layer
    notes = pruned.config.fxprune["constraints"]["model.layers.1.mlp.gate_proj"]
    assert "the mean of the per-layer widths asked, [32, 64]" in notes
    with pytest.raises(ConfigMismatchError, match=r"intermediate_size would differ between layers "
                                                  r"\(model.layers.0.mlp.gate_proj: 32, model.layers.1."
                                                  r"mlp.gate_proj: 64.*hf_compatible=True"):
        fxprune.hf.prune(model, inputs, sparsity=ratios, hf_compatible=False)


@pytest.mark.slow
def test_a_ratio_per_config_field():
    # {config field: ratio}: heads and MLP halved, the hidden size (not named) kept, as LLM recipes do
    model = _model("llama")
    result = fxprune.hf.prune_with_result(model, _inputs("llama", 2, 8),
                                          sparsity={"intermediate_size": 0.5, "num_attention_heads": 0.5})
    config = result.model.config
    assert (config.hidden_size, config.intermediate_size, config.num_key_value_heads) == (32, 32, 1)
    assert "intermediate_size: 0.5 asked" in result.plan.options.hf["constraints"]["model.layers.0.mlp.gate_proj"]
    with pytest.raises(fxprune.errors.InvalidOptionError, match="config field 'n_inner'.*its fields"):
        fxprune.hf.prune(model, _inputs("llama", 2, 8), sparsity={"n_inner": 0.5})


@pytest.mark.slow
def test_round_to_counts_channels_not_heads():
    # round_to=8: one kv head is head_dim = 8 channels, so 1 of 2 is aligned (rounding the head count
    # up to 8 kept every head); the MLP's 45 of 64 become 48
    result = fxprune.hf.prune_with_result(_model("llama"), _inputs("llama", 2, 8), round_to=8,
                                          sparsity={"intermediate_size": 0.3, "num_attention_heads": 0.5})
    config = result.model.config
    assert (config.intermediate_size, config.num_key_value_heads, config.num_attention_heads) == (48, 1, 2)


@pytest.mark.slow
def test_unconstrained_head_dims_are_refused():
    # without the policy the export level prunes rotary pairs inside every head: no config holds that
    with pytest.raises(ConfigMismatchError, match="a width no field of the config holds"):
        fxprune.hf.prune(_model("llama"), _inputs("llama", 2, 8), sparsity=0.5, hf_compatible=False)


@pytest.mark.slow
def test_shared_indices_are_the_same_in_every_layer():
    result = fxprune.hf.prune_with_result(_model("llama"), _inputs("llama", 2, 8), sparsity=0.5,
                                          layer_indices="shared")
    kept = result.plan.kept_indices
    assert kept["model.layers.0.mlp.up_proj.weight"] == kept["model.layers.1.mlp.up_proj.weight"]
    own = _pruned("llama")[1].plan.kept_indices
    assert own["model.layers.0.mlp.up_proj.weight"] != own["model.layers.1.mlp.up_proj.weight"]


class _NoSmallerMLP(T.LlamaForCausalLM):
    """A class whose constructor only accepts its original width: from_config cannot rebuild it."""

    def __init__(self, config):
        if config.intermediate_size != 64:
            raise ValueError(f"intermediate_size must be 64, got {config.intermediate_size}")
        super().__init__(config)


@pytest.mark.slow
def test_a_class_from_config_cannot_rebuild_is_a_typed_error():
    torch.manual_seed(0)
    model = _NoSmallerMLP(tiny_config("llama")).eval()
    with pytest.raises(UnsupportedModelError, match="_NoSmallerMLP.from_config could not rebuild.*"
                                                    "intermediate_size must be 64, got 32"):
        fxprune.hf.prune(model, _inputs("llama", 2, 8), sparsity=0.5)


@pytest.mark.slow
def test_dynamic_shapes_export_rejects_name_the_dim():
    # ViT checks the image size against its config: a dynamic height is specialised by export
    height = torch.export.Dim("height", min=8, max=64)
    spec = ({0: torch.export.Dim("batch", min=1), 2: height},)
    with pytest.raises(DynamicShapesError, match="height"):
        fxprune.hf.prune(_model("vit"), _inputs("vit", 2, 8), sparsity=0.5, dynamic_shapes=spec)


def test_not_a_pretrained_model_and_training_mode_are_refused():
    with pytest.raises(UnsupportedModelError, match="PreTrainedModel, got Linear"):
        fxprune.hf.prune(torch.nn.Linear(2, 2), (torch.zeros(1, 2),))
    torch.manual_seed(0)
    model = T.LlamaForCausalLM(tiny_config("llama"))  # constructed in training mode
    with pytest.raises(fxprune.errors.TrainingModeError, match="model.eval()"):
        fxprune.hf.prune(model, _inputs("llama", 2, 8))


@pytest.mark.slow
def test_cli_writes_a_directory_from_pretrained_loads(tmp_path):
    from fxprune.cli import main
    source, out = tmp_path / "tiny", tmp_path / "pruned"
    _model("llama").save_pretrained(source)
    argv = ["prune", f"hf:{source}", "--input-shape", "2,8", "--sparsity", "0.5", "--out", str(out),
            "--no-progress", "--no-chart"]
    assert main(argv) == 0
    loaded = T.LlamaForCausalLM.from_pretrained(out).eval()
    assert (loaded.config.intermediate_size, loaded.config.num_key_value_heads) == (32, 1)
    plan = fxprune.Plan.from_json((out / "plan.json").read_text())
    kept = plan.kept_indices
    assert len(kept["model.layers.0.mlp.up_proj.weight"][0]) == 32
    assert kept["model.layers.0.mlp.up_proj.weight"] == kept["model.layers.0.mlp.gate_proj.weight"]
    assert "intermediate_size   | 64     | 32" in (out / "summary.md").read_text()


def test_cli_bad_hf_spec_is_one_line(tmp_path, capsys):
    from fxprune.cli import main
    assert main(["prune", f"hf:{tmp_path / 'missing'}", "--input-shape", "2,8", "--out",
                 str(tmp_path / "out"), "--no-progress", "--no-chart"]) == 2
    assert "no config.json there" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def _remote_code_repo(directory, marker):
    """A model directory whose config maps its classes to the repository's own ``evil.py`` (``auto_map``),
    which creates ``marker`` when imported."""
    import json
    directory.mkdir()
    config = dict(model_type="fxprune_evil", architectures=["EvilModel"],
                  auto_map={"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"})
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "evil.py").write_text(f"from pathlib import Path\nPath({str(marker)!r}).touch()\n"
                                       "from transformers import PretrainedConfig\n"
                                       "class EvilConfig(PretrainedConfig):\n    model_type = 'fxprune_evil'\n")
    return directory


@pytest.mark.parametrize("command", ["inspect", "prune"])
def test_hf_spec_never_runs_the_repository_code(tmp_path, capsys, monkeypatch, command):
    """Even with ``y`` on stdin (transformers' prompt), an ``auto_map`` repository is refused."""
    import io
    from fxprune.cli import main
    marker = tmp_path / "PWNED"
    repo = _remote_code_repo(tmp_path / "repo", marker)
    monkeypatch.setattr("sys.stdin", io.StringIO("y\ny\n"))
    extra = ["--out", str(tmp_path / "out"), "--no-progress", "--no-chart"] if command == "prune" else []
    assert main([command, f"hf:{repo}", "--input-shape", "2,8", *extra]) == 2
    assert "fxprune: error: bad SPEC" in capsys.readouterr().err
    assert not marker.exists()


@pytest.mark.parametrize("name", ["pipeline", "AutoModelForCausalLM", "__class__", "LlamaConfig", ["x"]])
def test_hf_architecture_must_be_a_pretrained_model_class(tmp_path, capsys, name):
    import json
    from fxprune.cli import main
    config = tiny_config("llama").to_dict()
    config["architectures"] = [name]
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert main(["inspect", f"hf:{tmp_path}", "--input-shape", "2,8"]) == 2
    err = capsys.readouterr().err
    assert "must name a transformers PreTrainedModel class" in err and len(err.strip().splitlines()) == 1


def test_only_the_kinds_asked_are_scored_and_the_model_is_the_same(monkeypatch) -> None:
    """``{"intermediate_size": r}`` scores the MLP groups alone (the residual stream, read by every
    layer and the LM head, is kept whole): the same model as when every group is scored."""
    from fxprune.data import criteria
    from fxprune.hf import in_memory
    model, ids = _model("llama"), torch.randint(3, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))
    scored: list[str] = []
    score_group = criteria.score_group
    monkeypatch.setattr(criteria, "score_group", lambda analysis, group, *a, **k: (
        scored.append(group.name), score_group(analysis, group, *a, **k))[1])
    pruned = fxprune.hf.prune(model, (ids,), {"intermediate_size": 0.5}, "energy", calibration=[ids])
    assert scored and all(".mlp." in name for name in scored)
    monkeypatch.setattr(in_memory, "_groups_to_score", lambda *_: None)
    scored.clear()
    every = fxprune.hf.prune(model, (ids,), {"intermediate_size": 0.5}, "energy", calibration=[ids])
    assert any(".mlp." not in name for name in scored)
    for (key, a), b in zip(pruned.state_dict().items(), every.state_dict().values()):
        assert torch.equal(a, b), key


def test_the_output_check_reads_logits_a_few_rows_at_a_time() -> None:
    """``max |a - b|`` in float32 by row chunks equals the whole computation (bf16 logits included)."""
    from fxprune.hf.in_memory import _max_abs
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 70, 11, generator=g).bfloat16(), torch.randn(3, 70, 11, generator=g).bfloat16()
    assert _max_abs(a, b, rows=64) == _max_abs(a, b) == float((a.float() - b.float()).abs().max())
    assert _max_abs(a) == float(a.float().abs().max()) and _max_abs(torch.tensor(-2.0)) == 2.0
