"""fxprune.hf.prune_checkpoint with calibration: the activation criteria and ``reconstruct`` run layer by
layer from disk (fxprune.hf.layerwise) and equal the in-memory fxprune.hf.prune with the same options
and batches; an interrupted run resumes; two gloo ranks splitting the batches equal one process."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

transformers = pytest.importorskip("transformers")
import fxprune.hf  # noqa: E402  (needs transformers)
from fxprune.errors import CalibrationError, InvalidOptionError  # noqa: E402
from fxprune.hf import layerwise  # noqa: E402
from fxprune.hf import prune_checkpoint  # noqa: E402

T = transformers
CONFIG = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
#: The MLP and the heads: reconstruct refits down_proj and o_proj (biases through mlp_bias and attention_bias).
SPARSITY = {"intermediate_size": 0.25, "num_attention_heads": 0.5}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    directory = tmp_path_factory.mktemp("layerwise") / "src"
    torch.manual_seed(0)
    T.LlamaForCausalLM(T.LlamaConfig(**CONFIG)).eval().save_pretrained(directory, max_shard_size="30KB")
    return directory


def _batches(n: int = 4):
    g = torch.Generator().manual_seed(1)
    return [torch.randint(3, 100, (2, 12), generator=g) for _ in range(n)]


def _assert_close(expected, out, atol: float = 0.0):
    loaded = T.AutoModelForCausalLM.from_pretrained(out).eval()
    got, want = loaded.state_dict(), expected.state_dict()
    assert sorted(got) == sorted(want)
    for key in want:
        assert got[key].shape == want[key].shape, key
        torch.testing.assert_close(got[key], want[key], atol=atol, rtol=0 if atol == 0 else 1e-5, msg=key)
    ours, theirs = loaded.config.to_dict(), expected.config.to_dict()
    for config in (ours, theirs):
        config.pop("_name_or_path")
        config["fxprune"].pop("max_abs_error_vs_graph")
    assert ours == theirs


class _Interrupted(OSError):
    pass


@pytest.fixture(scope="module")
def one_process(source, tmp_path_factory):
    """flap + reconstruct from disk, one process, every batch."""
    out = tmp_path_factory.mktemp("one") / "out"
    prune_checkpoint(source, out, SPARSITY, "flap", calibration=_batches(), recover="reconstruct")
    return out


def test_flap_and_reconstruct_from_disk_equal_in_memory(source, one_process):
    model = T.LlamaForCausalLM.from_pretrained(source).eval()
    expected = fxprune.hf.prune(model, torch.randint(0, 100, (2, 8)), SPARSITY, "flap", calibration=_batches(),
                                recover="reconstruct")
    _assert_close(expected, one_process)  # bit for bit: the same sums in the same order
    assert expected.config.mlp_bias and expected.config.attention_bias


def test_an_interrupted_run_resumes_with_the_same_result(source, one_process, tmp_path, monkeypatch):
    from safetensors import torch as st
    save_file, calls = st.save_file, []

    def fails_on_the_third(tensors, path, metadata=None):  # the disk fills while layer 1 is written
        calls.append(path)
        if len(calls) == 3:
            raise _Interrupted(28, "No space left on device")
        save_file(tensors, path, metadata=metadata)

    monkeypatch.setattr(st, "save_file", fails_on_the_third)
    with pytest.raises(_Interrupted):
        prune_checkpoint(source, tmp_path / "out", SPARSITY, "flap", calibration=_batches(), recover="reconstruct")
    assert not (tmp_path / "out").exists()
    monkeypatch.setattr(st, "save_file", save_file)
    monkeypatch.setattr(layerwise, "statistics", None)  # the plan comes from the interrupted run: no walk
    report = prune_checkpoint(source, tmp_path / "out", SPARSITY, "flap", calibration=_batches(),
                              recover="reconstruct", spill_bytes=0)  # every carried activation memory-mapped
    assert report["resumed_units"] == 2
    assert [r[0] for r in report["timings"]["reconstruct"]["errors"]] == [
        "model.layers.0.self_attn.o_proj", "model.layers.0.mlp.down_proj", "model.layers.1.self_attn.o_proj",
        "model.layers.1.mlp.down_proj"]
    _assert_close(T.AutoModelForCausalLM.from_pretrained(one_process).eval(), tmp_path / "out")
    assert not list(tmp_path.glob(".*partial*"))


def test_wanda_on_every_width_without_recovery_equals_in_memory(source, tmp_path):
    prune_checkpoint(source, tmp_path / "out", 0.25, "wanda", calibration=_batches(2))
    model = T.LlamaForCausalLM.from_pretrained(source).eval()
    _assert_close(fxprune.hf.prune(model, torch.randint(0, 100, (2, 8)), 0.25, "wanda", calibration=_batches(2)),
                  tmp_path / "out")


def test_energy_reads_the_head_groups_gram_matrices_from_disk_as_in_memory(source, tmp_path, monkeypatch):
    # a head spans head_dim columns of o_proj: its score has the Gram matrix's cross terms
    walked, walk = [], layerwise.walk_statistics
    monkeypatch.setattr(layerwise, "walk_statistics", lambda *a, **k: walked.append(walk(*a, **k)) or walked[-1])
    prune_checkpoint(source, tmp_path / "out", SPARSITY, "energy", calibration=_batches(2))
    assert len(walked[0].grams) == CONFIG["num_hidden_layers"]  # o_proj of each layer, read from the shards
    model = T.LlamaForCausalLM.from_pretrained(source).eval()
    _assert_close(fxprune.hf.prune(model, torch.randint(0, 100, (2, 8)), SPARSITY, "energy", calibration=_batches(2)),
                  tmp_path / "out")


def test_padded_batches_are_refused_from_disk(source, tmp_path):
    ids = torch.randint(3, 100, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 8:] = 0
    with pytest.raises(CalibrationError, match="calibration batch 0 is padded"):
        prune_checkpoint(source, tmp_path / "out", SPARSITY, "flap",
                         calibration=[{"input_ids": ids, "attention_mask": mask}])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("given, error, message", [
    (dict(criterion="taylor", calibration=[torch.zeros(1, 4, dtype=torch.long)]), InvalidOptionError,
     "a gradient criterion needs a backward pass"),
    (dict(criterion="flap", calibration=[torch.zeros(1, 4, dtype=torch.long)], recover="compensate-bias"),
     InvalidOptionError, "runs the recovery steps .'reconstruct',. layer by layer, got 'compensate-bias'"),
    (dict(criterion="l2", recover="reconstruct"), CalibrationError, "needs calibration data"),
    (dict(criterion="flap", calibration=[torch.full((1, 4), 100)]), CalibrationError,
     "token id 100, outside the model's vocabulary of 100"),
    (dict(criterion="flap", calibration=[torch.zeros(1, 4, dtype=torch.long)], device="tpu"), InvalidOptionError,
     "device='tpu'"),
    (dict(criterion="flap", calibration=[torch.zeros(1, 4, dtype=torch.long)], spill_bytes=-1),
     InvalidOptionError, "spill_bytes"),
])
def test_bad_data_options_are_typed_errors_with_no_output(source, tmp_path, given, error, message):
    with pytest.raises(error, match=message):
        prune_checkpoint(source, tmp_path / "out", SPARSITY, **given)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_without_cuda_is_refused(source, tmp_path):
    with pytest.raises(InvalidOptionError, match="device='cuda': CUDA is not available"):
        prune_checkpoint(source, tmp_path / "out", SPARSITY, "flap", calibration=_batches(1), device="cuda")


_RANK = textwrap.dedent("""
    import sys, torch
    torch.set_num_threads(1)
    rank, init, src, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    from fxprune.hf import prune_checkpoint
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(3, 100, (2, 12), generator=g) for _ in range(4)]
    report = prune_checkpoint(src, out, {sparsity!r}, "flap", calibration=batches, recover="reconstruct")
    assert report["bytes_written"] > 0
    torch.distributed.destroy_process_group()
""").format(sparsity=SPARSITY)


def test_two_gloo_ranks_equal_one_process_on_all_the_batches(source, one_process, tmp_path):
    script = tmp_path / "rank.py"
    script.write_text(_RANK)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), *sys.path]), "OMP_NUM_THREADS": "1"}
    init = f"file://{tmp_path / 'rendezvous'}"
    ranks = [subprocess.Popen([sys.executable, str(script), str(r), init, str(source), str(tmp_path / "two")],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for r in range(2)]
    for rank in ranks:
        output = rank.communicate(timeout=120)[0].decode()
        assert rank.returncode == 0, output[-3000:]
    _assert_close(T.AutoModelForCausalLM.from_pretrained(one_process).eval(), tmp_path / "two", atol=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rank.py", "rendezvous", "two"]  # rank 1 wrote nothing
