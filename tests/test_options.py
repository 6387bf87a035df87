"""Options declared once: the API's keywords, the passes' fields, the CLI's flags, the HF adapter's keywords
and a plan's JSON fields are the fields of ``PruneOptions``, with the same names and defaults; a route
that cannot honour an option refuses it with a typed error, never ignores it."""
from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
from torch import nn

import fxprune
from fxprune.cli import build_parser, main
from fxprune.cli.flags import given_options
from fxprune.errors import InvalidOptionError
from fxprune.options import PruneOptions, public_fields
from fxprune.passes import MaskChannels, PruneChannels

#: A valid value other than the default, for every option.
CHANGED = {"sparsity": 0.25, "criterion": "l2", "capture": "export", "reduce": "max", "global_ranking": True,
           "round_to": 2, "min_keep": 2, "ignore": ("2",), "normalize": "standardize", "min_keep_ratio": 0.25,
           "prune_outputs": True, "split_axis": "outer", "propagate_bias": True, "seed": 3}
#: The flag spelling of each changed value.
FLAG_TEXT = {"ignore": ["2"], "global_ranking": [], "prune_outputs": [], "propagate_bias": []}


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)).eval()


def _flag_argv(name: str) -> list[str]:
    flag = "--" + name.replace("_", "-")
    return [flag, *FLAG_TEXT.get(name, [str(CHANGED[name])])]


def test_every_option_has_a_changed_value():
    assert set(CHANGED) == set(public_fields())
    for name, value in CHANGED.items():
        assert value != public_fields()[name].default, name
        assert getattr(PruneOptions(**{name: value}), name) == value


def test_the_api_takes_every_option_by_name_and_records_it_in_the_plan():
    x = torch.randn(2, 6)
    for name, value in CHANGED.items():
        result = fxprune.prune(_net(), (x,), **{name: value})
        assert getattr(result.plan.options, name) == value, name


def test_an_unknown_or_internal_option_is_refused_by_name():
    x = torch.randn(2, 6)
    with pytest.raises(InvalidOptionError, match="unknown option 'round_too'"):
        fxprune.prune(_net(), (x,), round_too=8)
    with pytest.raises(InvalidOptionError, match="unknown option 'hf'"):
        fxprune.prune(_net(), (x,), hf={})


def test_options_value_and_keywords_combine():
    x = torch.randn(2, 6)
    base = PruneOptions(sparsity=0.25, round_to=2)
    result = fxprune.prune(_net(), (x,), options=base, seed=5)
    assert result.plan.options == base.replace(seed=5)
    with pytest.raises(InvalidOptionError, match="options= takes a fxprune.PruneOptions"):
        fxprune.prune(_net(), (x,), options={"round_to": 2})


def test_the_cli_flags_are_the_options():
    prune = build_parser()._subparsers._group_actions[0].choices["prune"]
    dests = {a.dest for a in prune._actions}
    runtime = {"help", "spec", "input_shape", "out", "calibration", "calibration_batch_size", "max_batches",
               "to", "quantize", "no_progress", "no_chart", "output"}
    assert dests - runtime == set(public_fields())
    for name in public_fields():
        args = build_parser().parse_args(["prune", "m:f", "--out", "o", *_flag_argv(name)])
        assert given_options(args) == {name: CHANGED[name]}, name
    assert given_options(build_parser().parse_args(["prune", "m:f", "--out", "o"])) == {}


def test_a_flag_is_checked_where_the_option_is():
    with pytest.raises(SystemExit):
        build_parser().parse_args(["prune", "m:f", "--out", "o", "--min-keep-ratio", "1.5"])
    args = build_parser().parse_args(["prune", "m:f", "--out", "o", "--sparsity", "fc*=0.3,conv*=0.1"])
    assert given_options(args) == {"sparsity": {"fc*": 0.3, "conv*": 0.1}}


def test_the_passes_fields_are_the_options_but_capture():
    prune_fields = {f.name: f.default for f in dataclasses.fields(PruneChannels)}
    assert set(prune_fields) == set(public_fields()) - {"capture"}
    for name, default in prune_fields.items():
        if name != "sparsity":  # required by prune-channels
            assert default == public_fields()[name].default, name
    masked = {f.name for f in dataclasses.fields(MaskChannels)} - {"plan_json"}
    assert masked == set(public_fields()) - {"capture", "prune_outputs", "propagate_bias"}


def test_the_plan_json_holds_every_option():
    options = PruneOptions(**CHANGED)
    assert set(options.to_dict()) == set(public_fields())
    assert PruneOptions.from_dict(json.loads(json.dumps(options.to_dict()))) == options


def test_a_prune_result_deep_copies():
    x = torch.randn(2, 6)
    result = fxprune.prune(_net(), (x,), sparsity={"0": 0.5})
    again = copy.deepcopy(result)
    assert again.plan == result.plan and again.graph_module is not result.graph_module
    torch.testing.assert_close(again.graph_module(x), result.graph_module(x))


# --- the HF route: every option honoured or refused ------------------------------------------------
transformers = pytest.importorskip("transformers")
import fxprune.hf  # noqa: E402  (needs transformers)

#: What fxprune.hf cannot honour (its models are exported, keep their output widths, hold no folded bias).
HF_REFUSED = {"capture": "fx", "prune_outputs": True, "propagate_bias": True}


def test_the_hf_route_honours_or_refuses_every_option():
    for name, value in CHANGED.items():
        given = {name: HF_REFUSED.get(name, value)}
        if name in HF_REFUSED:
            with pytest.raises(InvalidOptionError, match=f"cannot honour {name}="):
                fxprune.hf.hf_options(None, given, hf_compatible=True)
            continue
        options = fxprune.hf.hf_options(None, given, hf_compatible=True)
        assert getattr(options, name) == value, name
    # hf_compatible=True needs whole heads, which the outer axis gives (the default value yields to it)
    assert fxprune.hf.hf_options(None, {}, hf_compatible=True).split_axis == "outer"


def _llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(config).eval()


def test_the_hf_adapter_applies_normalize_and_min_keep_ratio():
    ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    out = fxprune.hf.prune_with_result(_llama(), (ids,), 0.5, global_ranking=True, normalize="standardize",
                                       min_keep_ratio=0.75)
    assert (out.plan.options.normalize, out.plan.options.min_keep_ratio) == ("standardize", 0.75)
    assert all(g.kept >= 0.75 * g.size for g in out.plan.groups if g.kept < g.size)


def test_the_hf_cli_route_honours_or_refuses_every_flag(tmp_path, capsys):
    source = tmp_path / "tiny"
    _llama().save_pretrained(source)
    base = ["prune", f"hf:{source}", "--input-shape", "2,8", "--no-progress", "--no-chart"]
    out = tmp_path / "pruned"
    assert main([*base, "--out", str(out), "--normalize", "standardize", "--global-ranking",
                 "--min-keep-ratio", "0.2", "--round-to", "2"]) == 0
    options = fxprune.Plan.from_json((out / "plan.json").read_text()).options
    assert (options.normalize, options.min_keep_ratio, options.round_to, options.global_ranking) == \
        ("standardize", 0.2, 2, True)
    capsys.readouterr()
    for refused in (["--prune-outputs"], ["--propagate-bias"], ["--capture", "fx"], ["--to", "onnx"],
                    ["--calibration", str(tmp_path / "c.safetensors")]):
        target = tmp_path / "refused"
        assert main([*base, "--out", str(target), *refused]) == 2, refused
        assert refused[0].lstrip("-").split("-")[0] in capsys.readouterr().err
        assert not target.exists()
