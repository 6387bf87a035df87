"""fxprune.hf.prune_checkpoint: a safetensors checkpoint pruned disk to disk equals, tensor for tensor,
the in-memory fxprune.hf.prune of the same model and options; loads with stock from_pretrained;
resumes after an interruption; refuses bad input with a typed error and no output."""
from __future__ import annotations

import json
import re
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")
import fxprune.hf  # noqa: E402  (needs transformers)
from fxprune.errors import CheckpointError, InvalidOptionError  # noqa: E402
from fxprune.hf import checkpoint  # noqa: E402
from fxprune.hf import prune_checkpoint  # noqa: E402

T = transformers
CONFIG = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _save(directory, tie: bool = False):
    torch.manual_seed(0)
    model = T.LlamaForCausalLM(T.LlamaConfig(**CONFIG, tie_word_embeddings=tie)).eval()
    model.save_pretrained(directory, max_shard_size="30KB")  # several shards
    (directory / "tokenizer_config.json").write_text('{"model_max_length": 64}')
    return directory


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return _save(tmp_path_factory.mktemp("ckpt") / "src")


def _in_memory(directory, sparsity, criterion):
    model = T.LlamaForCausalLM.from_pretrained(directory).eval()
    return fxprune.hf.prune(model, torch.randint(0, 100, (2, 8)), sparsity, criterion)


def _assert_same(expected, out):
    loaded = T.AutoModelForCausalLM.from_pretrained(out).eval()
    got, want = loaded.state_dict(), expected.state_dict()
    assert sorted(got) == sorted(want)
    for key in want:
        assert torch.equal(got[key], want[key]), key
    ours, theirs = loaded.config.to_dict(), expected.config.to_dict()
    for config in (ours, theirs):
        config.pop("_name_or_path")
        config["fxprune"].pop("max_abs_error_vs_graph")  # nothing runs on the disk-to-disk path
    assert ours == theirs


#: Two criteria by default (an export per run costs ~15 s on CI's cores); the others under -m slow.
FAST = ("l2", "group_magnitude")


@pytest.mark.parametrize("criterion", [c if c in FAST else pytest.param(c, marks=pytest.mark.slow)
                                       for c in checkpoint.STREAMING_CRITERIA])
def test_disk_to_disk_equals_in_memory(source, tmp_path, criterion):
    report = prune_checkpoint(source, tmp_path / "out", 0.5, criterion)
    _assert_same(_in_memory(source, 0.5, criterion), tmp_path / "out")
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert files == ["config.json", "fxprune-checkpoint.json", "generation_config.json",
                     *[f"model-0000{i}-of-00007.safetensors" for i in range(1, 8)],
                     "model.safetensors.index.json", "plan.json", "tokenizer_config.json"]
    assert [u["name"] for u in report["units"]] == ["model.embed_tokens.weight", "model.layers.0",
                                                    "model.layers.1", "model.layers.2", "model.layers.3",
                                                    "model.norm.weight",
                                                    "lm_head.weight"]
    assert report["bytes_written"] < report["bytes_read"]


def test_tied_embeddings_and_a_ratio_per_field(tmp_path):
    source = _save(tmp_path / "tied", tie=True)
    sparsity = {"intermediate_size": 0.25, "num_attention_heads": 0.5}
    prune_checkpoint(source, tmp_path / "out", sparsity, "l1")
    _assert_same(_in_memory(source, sparsity, "l1"), tmp_path / "out")
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert "lm_head.weight" not in index["weight_map"]  # stored once, as the source does


class _Interrupted(OSError):
    pass


def test_an_interrupted_run_resumes_from_the_last_finished_unit(source, tmp_path, monkeypatch):
    from safetensors import torch as st
    save_file, calls = st.save_file, []

    def fails_on_the_fourth(tensors, path, metadata=None):  # the disk fills while unit 4 is written
        calls.append(path)
        if len(calls) == 4:
            raise _Interrupted(28, "No space left on device")
        save_file(tensors, path, metadata=metadata)

    monkeypatch.setattr(st, "save_file", fails_on_the_fourth)
    with pytest.raises(_Interrupted):
        prune_checkpoint(source, tmp_path / "out", 0.5, "l2")
    assert not (tmp_path / "out").exists()  # nothing that looks like an output
    monkeypatch.setattr(st, "save_file", save_file)
    report = prune_checkpoint(source, tmp_path / "out", 0.5, "l2")
    assert report["resumed_units"] == 3
    assert [u.get("resumed", False) for u in report["units"]] == [True] * 3 + [False] * 4
    _assert_same(_in_memory(source, 0.5, "l2"), tmp_path / "out")
    assert not list(tmp_path.glob(".*partial*"))


@pytest.mark.slow
def test_other_arguments_start_over(source, tmp_path, monkeypatch):
    from safetensors import torch as st
    save_file = st.save_file

    def fails(tensors, path, metadata=None):
        if "00002" in str(path):
            raise _Interrupted(28, "No space left on device")
        save_file(tensors, path, metadata=metadata)

    monkeypatch.setattr(st, "save_file", fails)
    with pytest.raises(_Interrupted):
        prune_checkpoint(source, tmp_path / "out", 0.5, "l2")
    monkeypatch.setattr(st, "save_file", save_file)
    report = prune_checkpoint(source, tmp_path / "out", 0.25, "l2")
    assert report["resumed_units"] == 0
    _assert_same(_in_memory(source, 0.25, "l2"), tmp_path / "out")


def _copy(source, tmp_path):
    copy = tmp_path / "src"
    shutil.copytree(source, copy)
    return copy


def _shard(directory, n: int):
    return sorted(directory.glob("model-*.safetensors"))[n]


def _edit_config(directory, **fields):
    path = directory / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


BAD = {
    "missing shard": (lambda d: _shard(d, 1).unlink(), r"shard model-00002-of-0000\d.safetensors .* is missing"),
    "truncated shard": (lambda d: _shard(d, 0).write_bytes(_shard(d, 0).read_bytes()[:-100]),
                        r"model-00001-of-0000\d.safetensors is truncated"),
    "index names a missing tensor": (
        lambda d: (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
            **json.loads((d / "model.safetensors.index.json").read_text())["weight_map"],
            "model.layers.9.mlp.up_proj.weight": _shard(d, 0).name}})),
        r"names tensor 'model.layers.9.mlp.up_proj.weight' in model-00001"),
    "config does not match a shape": (lambda d: _edit_config(d, intermediate_size=48),
                                      r"'model.layers.0.mlp.gate_proj.weight' in model-0000\d.* has shape "
                                      r"\[64, 32\], the config builds \[48, 32\]"),
    "config builds a tensor no shard holds": (lambda d: _edit_config(d, num_hidden_layers=5),
                                              r"builds tensor 'model.layers.4.*no shard"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_checkpoints_are_typed_errors_and_leave_no_output(source, tmp_path, case):
    damage, message = BAD[case]
    src = _copy(source, tmp_path)
    damage(src)
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    with pytest.raises(CheckpointError, match=message):
        prune_checkpoint(src, tmp_path / "out", 0.5, "l2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no output, no partial directory
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before  # the input untouched


def test_output_inside_the_input_or_not_empty_is_refused(source, tmp_path):
    with pytest.raises(CheckpointError, match="inside the input"):
        prune_checkpoint(source, source / "pruned", 0.5, "l2")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="exists and is not empty"):
        prune_checkpoint(source, tmp_path / "taken", 0.5, "l2")
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"


def test_not_enough_disk_is_refused_before_writing(source, tmp_path, monkeypatch):
    full = shutil.disk_usage(tmp_path)._replace(free=10_000)  # a disk with 10 kB left
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda path: full)
    with pytest.raises(CheckpointError, match=r"not enough disk for the output: it needs 0\.\d+ GB"):
        prune_checkpoint(source, tmp_path / "out", 0.5, "l2")
    assert list(tmp_path.iterdir()) == []


def test_a_data_aware_criterion_without_calibration_is_refused_with_the_reason(source, tmp_path):
    with pytest.raises(InvalidOptionError, match="'wanda': a data-aware criterion reads activations: pass "
                                                 "calibration="):
        prune_checkpoint(source, tmp_path / "out", 0.5, "wanda")
    assert list(tmp_path.iterdir()) == []


def test_cli_prunes_a_checkpoint_directory_disk_to_disk(source, tmp_path, capsys):
    from fxprune.cli import main
    argv = ["prune", f"hf:{source}", "--sparsity", "0.5", "--criterion", "l2", "--out", str(tmp_path / "out"),
            "--no-progress", "--no-chart"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "disk to disk" in printed and re.search(r"intermediate_size +\| 64 +\| 32", printed)
    _assert_same(_in_memory(source, 0.5, "l2"), tmp_path / "out")
    assert main(argv[:5] + ["wanda", "--out", str(tmp_path / "other"), "--no-progress"]) == 2
    assert "disk-to-disk route offers" in capsys.readouterr().err


def test_a_hidden_size_transformers_would_refuse_is_rounded_to_whole_heads(source, tmp_path):
    """transformers refuses a hidden size that is not a multiple of the query heads: 0.0625 of 32 would
    keep 30 of 4 heads' hidden size, and the policy rounds it up to 32 (nothing pruned, nothing refused)."""
    prune_checkpoint(source, tmp_path / "out", {"hidden_size": 0.0625}, "l2")
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["hidden_size"] == 32 and written["fxprune"]["changes"] == {}


def test_a_config_transformers_refuses_is_a_typed_error():
    """The safety net behind that rule, run on every new config before anything is written."""
    from fxprune.errors import ConfigMismatchError
    from fxprune.hf.in_memory import _check_config
    config = T.LlamaConfig(**CONFIG)
    config.hidden_size = 30
    with pytest.raises(ConfigMismatchError, match=r"transformers refuses the pruned config: The hidden size \(30\) "
                                                  r"is not a multiple of the number of attention heads \(4\)"):
        _check_config(config)


@pytest.mark.parametrize("kept", [{0: [1, 4, 5, 9]}, {1: [0, 2, 3]}, {0: [0, 7, 8], 1: [1, 4]}, {}, {0: [5, 2]}],
                         ids=["rows", "columns", "both", "none", "rows-out-of-order"])
def test_a_tensor_read_to_be_sliced_in_chunks_equals_the_slice_of_the_whole(tmp_path, monkeypatch, kept):
    """The write pass reads a tensor a few rows at a time, slicing each chunk into the output (an 8B
    embedding is never held whole beside its slice); the result is the slice of the whole tensor."""
    from safetensors.torch import save_file
    weight = torch.arange(10 * 6, dtype=torch.float32).reshape(10, 6).to(torch.bfloat16)
    save_file({"w": weight}, str(tmp_path / checkpoint.SINGLE))
    shards = checkpoint.Shards.open(tmp_path)
    monkeypatch.setattr(checkpoint, "READ_CHUNK_BYTES", 3 * 6 * 2)  # three rows a chunk: four chunks
    got = shards.read_sliced("w", kept)
    assert torch.equal(got, checkpoint.sliced(weight, kept))
    assert shards.bytes_read == weight.numel() * 2


def test_a_tensor_read_in_chunks_from_a_truncated_shard_names_it(tmp_path, monkeypatch):
    from safetensors.torch import save_file
    save_file({"w": torch.ones(10, 6)}, str(tmp_path / checkpoint.SINGLE))
    shards = checkpoint.Shards.open(tmp_path)
    path = tmp_path / checkpoint.SINGLE
    path.write_bytes(path.read_bytes()[:-40])  # cut after the header was read
    monkeypatch.setattr(checkpoint, "READ_CHUNK_BYTES", 3 * 6 * 4)
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*'w'"):
        shards.read_sliced("w", {0: [0, 9]})
