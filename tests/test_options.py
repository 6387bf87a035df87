"""Options declared once: the API's keywords, the passes' fields, the CLI's flags, the HF adapter's keywords
and a plan's JSON fields are the fields of ``PruneOptions``, with the same names and defaults; a route
that cannot honour an option refuses it with a typed error, never ignores it."""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import re

import pytest
import torch
from torch import nn

import fxprune
from fxprune.cli import build_parser, main
from fxprune.cli.flags import add_option_flags, given_options
from fxprune.errors import InvalidOptionError
from fxprune.options import PruneOptions, public_fields, route_fields
from fxprune.passes import DropBlocks, DropExperts, MaskChannels, PruneChannels

#: A valid value other than the default, for every option.
CHANGED = {"sparsity": 0.25, "criterion": "l2", "capture": "export", "reduce": "max", "global_ranking": True,
           "round_to": 2, "min_keep": 2, "ignore": ("2",), "normalize": "standardize", "min_keep_ratio": 0.25,
           "prune_outputs": True, "split_axis": "outer", "propagate_bias": True, "seed": 3,
           "block_criterion": "sleb", "block_repair": True, "expert_criterion": "random", "target": {"params": 0.8}}
#: The flag spelling of each changed value.
FLAG_TEXT = {"ignore": ["2"], "global_ranking": [], "prune_outputs": [], "propagate_bias": [], "block_repair": [],
             "target": ["params=0.8"]}
#: The options only fxprune.hf honours (whole layers, whole experts, a parameter budget).
HF_ONLY = {"block_criterion", "block_repair", "expert_criterion", "target"}


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
    assert set(route_fields()) == HF_ONLY
    for name, value in CHANGED.items():
        if name in HF_ONLY:  # a graph has no config to remove layers or experts from: refused by name
            with pytest.raises(InvalidOptionError, match=f"fxprune.prune cannot honour {name}=.*only fxprune.hf"):
                fxprune.prune(_net(), (x,), **{name: value})
            continue
        result = fxprune.prune(_net(), (x,), **{name: value})
        assert getattr(result.plan.options, name) == value, name


def test_the_option_tables_are_the_declared_names():
    from fxprune.data.block_criteria import BLOCK_CRITERION_RECORDS
    from fxprune.hf.experts import EXPERT_CRITERION_RECORDS
    from fxprune.options import BLOCK_CRITERIA, EXPERT_CRITERIA
    assert tuple(BLOCK_CRITERION_RECORDS) == public_fields()["block_criterion"].metadata["choices"] == BLOCK_CRITERIA
    assert tuple(EXPERT_CRITERION_RECORDS) == public_fields()["expert_criterion"].metadata["choices"] == \
        EXPERT_CRITERIA


@pytest.mark.parametrize("bad, message", [
    ({"block_criterion": "l1"}, "block_criterion must be one of"), ({"expert_criterion": "l2"}, "expert_criterion"),
    ({"target": {"params": 1.5}}, r"fraction in \(0, 1\)"), ({"target": {"flops": 0.5}}, "'flops' is not supported"),
    ({"target": {"params": 0.8, "active_params": 0.5}}, "one budget"), ({"target": 0.8}, "target must be a mapping"),
])
def test_whole_structure_options_are_checked_where_declared(bad, message):
    with pytest.raises(InvalidOptionError, match=message):
        PruneOptions(**bad)


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
    assert set(prune_fields) == set(public_fields()) - {"capture"} - HF_ONLY
    for name, default in prune_fields.items():
        if name != "sparsity":  # required by prune-channels
            assert default == public_fields()[name].default, name
    masked = {f.name for f in dataclasses.fields(MaskChannels)} - {"plan_json"}
    assert masked == set(public_fields()) - {"capture", "prune_outputs", "propagate_bias"} - HF_ONLY
    # drop-blocks' criterion and repair are block_criterion and block_repair, under the pass's names
    blocks = {f.name: f for f in dataclasses.fields(DropBlocks)}
    for name, option in (("criterion", "block_criterion"), ("repair", "block_repair")):
        assert blocks[name].default == public_fields()[option].default
        assert blocks[name].metadata["help"] == public_fields()[option].metadata["help"]
    experts = {f.name: f for f in dataclasses.fields(DropExperts)}
    assert experts["criterion"].default == public_fields()["expert_criterion"].default


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
from fxprune.testing.hf_models import tiny_model  # noqa: E402

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


def _llama(layers: int = 2):
    return tiny_model("llama", layers=layers)


def _ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 100, (2, 8), generator=torch.Generator().manual_seed(seed))


def test_the_hf_plan_records_the_whole_structure_options():
    out = fxprune.hf.prune_with_result(_llama(), (_ids(),), {"num_hidden_layers": 0.5}, block_criterion="angular",
                                       block_repair=True, calibration=[_ids(1)])
    options = out.plan.options
    assert (options.block_criterion, options.block_repair, dict(options.sparsity)) == \
        ("angular", True, {"num_hidden_layers": 0.5})
    assert out.plan.kept_indices == {}  # no width pruned: the layers' record is config.fxprune["depth"]
    assert fxprune.Plan.from_json(out.plan.to_json()).options == options
    assert out.model.config.fxprune["options"]["block_criterion"] == "angular"
    widths = fxprune.hf.prune_with_result(_llama(), (_ids(),), {"intermediate_size": 0.5, "num_hidden_layers": 0.5})
    assert dict(widths.plan.options.sparsity) == {"intermediate_size": 0.5, "num_hidden_layers": 0.5}
    assert widths.plan.kept_indices and widths.plan.options.hf["hf_compatible"] is True


@pytest.mark.parametrize("given, message", [
    (dict(sparsity=0.5, expert_criterion="random"), "expert_criterion='random' has no effect: the sparsity names "
                                                    "no expert count"),
    (dict(sparsity=0.5, block_repair=True), "block_repair=True has no effect"),
    (dict(sparsity={"num_hidden_layers": 0.5}, target={"params": 0.8}), "give target or sparsity, not both"),
])
def test_a_whole_structure_option_with_no_effect_is_refused(given, message):
    with pytest.raises(InvalidOptionError, match=message):
        fxprune.hf.prune(_llama(), (_ids(),), **given)


def test_the_disk_to_disk_route_refuses_whole_structures(tmp_path):
    from fxprune.hf import prune_checkpoint
    with pytest.raises(InvalidOptionError, match=r"prune_checkpoint \(disk to disk\) cannot honour block_repair"):
        prune_checkpoint(tmp_path / "in", tmp_path / "out", block_repair=True, criterion="l2")
    with pytest.raises(InvalidOptionError, match="widths only, not whole layers"):
        prune_checkpoint(tmp_path / "in", tmp_path / "out", {"num_hidden_layers": 0.5}, criterion="l2")


def test_the_hf_adapter_takes_no_option_as_a_loose_keyword():
    """Every option reaches fxprune.hf through PruneOptions (``**option_fields``): none is declared again."""
    import inspect
    keywords = set(inspect.signature(fxprune.hf.prune_with_result).parameters)
    assert keywords & set(public_fields()) == {"sparsity", "criterion"}


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


@pytest.mark.parametrize("family, layers, flags, config", [
    ("llama", 2, ["--sparsity", "num_hidden_layers=0.5", "--block-criterion", "angular", "--block-repair"],
     {"num_hidden_layers": 1}),
    ("mixtral", 2, ["--sparsity", "num_local_experts=0.5", "--expert-criterion", "frequency"],
     {"num_local_experts": 2}),
    ("llama", 4, ["--target", "params=0.8"], {}),
], ids=["depth", "experts", "budget"])
def test_the_hf_cli_removes_layers_experts_or_meets_a_budget(tmp_path, family, layers, flags, config):
    source, out = tmp_path / "tiny", tmp_path / "pruned"
    model = tiny_model(family, layers=layers)
    model.save_pretrained(source)
    assert main(["prune", f"hf:{source}", "--input-shape", "2,8", "--no-progress", "--no-chart", "--out", str(out),
                 *flags]) == 0
    loaded = type(model).from_pretrained(out)
    assert {k: getattr(loaded.config, k) for k in config} == config
    options = fxprune.Plan.from_json((out / "plan.json").read_text()).options
    given = given_options(build_parser().parse_args(["prune", "m:f", "--out", "o", *flags]))
    assert {k: getattr(options, k) for k in given if k != "sparsity"} == {k: v for k, v in given.items()
                                                                          if k != "sparsity"}
    assert loaded.config.fxprune["options"] == {k: v for k, v in options.to_dict().items() if k != "hf"}
    if "--target" in flags:
        assert abs(loaded.num_parameters() / model.num_parameters() - 0.8) < 0.03
        summary = (out / "summary.md").read_text()
        assert "target params=0.8" in summary
        assert re.search(r"budget: params 0.8, achieved 0\.7[89]\d .* ranked by the mixes' loss on the calibration "
                         r"data", summary)  # no data given: scored on the example
        assert summary.count("| chosen |") == 1
    else:
        assert options.sparsity == given["sparsity"]


def test_block_repair_takes_a_walk_by_name_or_the_flag_alone():
    parser = argparse.ArgumentParser()
    add_option_flags(parser, only=("block_repair",))
    assert given_options(parser.parse_args(["--block-repair"])) == {"block_repair": True}
    assert given_options(parser.parse_args(["--block-repair", "sequential-all"])) == {"block_repair": "sequential-all"}
    assert PruneOptions(block_repair="sequential").block_repair == "sequential"
    with pytest.raises(InvalidOptionError, match="block_repair must be one of"):
        PruneOptions(block_repair="everything")
