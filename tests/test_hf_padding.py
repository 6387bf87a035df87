"""Padded calibration batches (issue 18): an HF dict batch's ``attention_mask`` marks padding, which is
left out of every statistic — activation moments, wanda / flap, reconstruct's Gram matrices, the
gradient criteria's loss — so a padded batch prunes exactly as its sequences given one by one."""
from __future__ import annotations

import pytest
import torch

from fxprune.data.calibration import Calibration, calibration_sites, collect, gram_sites, token_rows
from fxprune.errors import CalibrationError

transformers = pytest.importorskip("transformers")
import fxprune.hf  # noqa: E402  (needs transformers)

T = transformers
VOCAB = 100
CONFIG = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
              pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=True)
SPARSITY = {"intermediate_size": 0.25, "num_attention_heads": 0.5}
LONG, SHORT = 16, 11


def _llama():
    torch.manual_seed(0)
    return T.LlamaForCausalLM(T.LlamaConfig(**CONFIG)).eval()


def _seq(seed: int, length: int) -> torch.Tensor:
    return torch.randint(3, VOCAB, (length,), generator=torch.Generator().manual_seed(seed))


SEQS = [(_seq(s, LONG), _seq(s + 10, SHORT)) for s in range(3)]
ONE_BY_ONE = [x[None] for pair in SEQS for x in pair]


def _padded(side: str, pad: int = 0) -> list[dict]:
    """Each pair as one batch of 2, the short row padded on ``side`` with id ``pad``."""
    out = []
    for a, b in SEQS:
        fill = torch.full((LONG - SHORT,), pad)
        row = torch.cat([b, fill]) if side == "right" else torch.cat([fill, b])
        real = torch.cat([torch.ones(SHORT), torch.zeros(LONG - SHORT)]).long()
        out.append({"input_ids": torch.stack([a, row]),
                    "attention_mask": torch.stack([torch.ones(LONG).long(), real if side == "right" else real.flip(0)])})
    return out


def _prune(calibration, criterion="wanda", recover=()):
    return fxprune.hf.prune_with_result(_llama(), (ONE_BY_ONE[0],), sparsity=SPARSITY, criterion=criterion,
                                        calibration=calibration, recover=recover)


def _same_model(a, b, atol=1e-5):
    assert a.model.config.to_dict()["intermediate_size"] == b.model.config.to_dict()["intermediate_size"]
    assert a.plan.kept_indices == b.plan.kept_indices
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], atol=atol, rtol=1e-4, msg=key)


def test_statistics_of_a_padded_batch_are_those_of_its_sequences():
    """Every sum (moments at every site, Gram matrices of every linear, counts) over real tokens only."""
    result = _prune(ONE_BY_ONE).result
    gm = result.analysis.gm
    sites, grams = calibration_sites(result.analysis), gram_sites(result.analysis)
    reference = collect(gm, ONE_BY_ONE, sites, grams)
    for side in ("right", "left"):
        calibration = fxprune.hf.calibrated.token_calibration(_padded(side, pad=57), VOCAB)
        padded = collect(gm, calibration, sites, grams)
        assert padded.sums.values.keys() == reference.sums.values.keys()
        for key, value in reference.sums.values.items():
            if key != ":batches":
                scale = float(value.abs().max()) or 1.0  # fp32 activations summed in fp64: rounding only
                torch.testing.assert_close(padded.sums[key], value, rtol=1e-5, atol=1e-6 * scale, msg=key)
    assert float(padded.count(sites[0].node)) == 3 * (LONG + SHORT)  # real tokens only


@pytest.mark.parametrize("criterion, recover, side", [
    ("wanda", (), "right"), ("flap", (), "right"), ("activation", (), "right"), ("hessian", (), "right"),
    ("flap", ("reconstruct",), "right"), ("wanda", ("compensate-bias",), "right"),
    ("flap", ("reconstruct",), "left"), ("hessian", (), "left"),  # left-padded rows: real tokens moved first
])
def test_padded_batches_prune_as_their_sequences_one_by_one(criterion, recover, side):
    _same_model(_prune(_padded(side), criterion, recover), _prune(ONE_BY_ONE, criterion, recover))


def test_taylor_ignores_what_the_padding_holds():
    """taylor sums each batch's mean loss (a batch of 2 is not two batches of 1), over real tokens: the
    padding's ids change nothing."""
    _same_model(_prune(_padded("right", pad=0), "taylor"), _prune(_padded("left", pad=91), "taylor"))


def test_padding_changes_the_statistics_when_not_masked():
    """The check above has teeth: the same padded ids without their mask give other statistics."""
    result = _prune(ONE_BY_ONE).result
    sites = calibration_sites(result.analysis)
    unmasked = [{"input_ids": b["input_ids"]} for b in _padded("right", pad=57)]
    a = collect(result.analysis.gm, fxprune.hf.calibrated.token_calibration(unmasked, VOCAB), sites)
    b = collect(result.analysis.gm, ONE_BY_ONE, sites)
    assert not torch.allclose(a.sums[f"{sites[1].node}:sq"], b.sums[f"{sites[1].node}:sq"])


@pytest.mark.parametrize("mask, message", [
    (torch.ones(2, 15), r"calibration batch 1: attention_mask of shape \[2, 15\] does not match input_ids \[2, 16\]"),
    (torch.ones(2, 16, 1), r"calibration batch 1: attention_mask of shape \[2, 16, 1\] does not match input_ids"),
    ("ones", r"calibration batch 1: attention_mask of shape str does not match input_ids"),
])
def test_a_mask_of_the_wrong_shape_is_a_typed_error_naming_batch_and_tensor(mask, message):
    model = _llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = _padded("right")[:1] + [{"input_ids": _padded("right")[1]["input_ids"], "attention_mask": mask}]
    with pytest.raises(CalibrationError, match=message):
        fxprune.hf.prune(model, (ONE_BY_ONE[0],), sparsity=SPARSITY, criterion="wanda", calibration=batches)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_non_causal_model_refuses_padding():
    torch.manual_seed(0)
    bert = T.BertForMaskedLM(T.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                          intermediate_size=64, max_position_embeddings=32)).eval()
    with pytest.raises(CalibrationError, match=r"batch 0: attention_mask has padded positions, and every token"):
        fxprune.hf.prune(bert, (ONE_BY_ONE[0],), sparsity={"intermediate_size": 0.25}, criterion="wanda",
                         calibration=_padded("right"))


def test_generic_calibration_reads_a_dict_attention_mask():
    """At the graph level too: Calibration's default mask is a dict batch's attention_mask."""
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    read = list(Calibration([{"input_ids": torch.zeros(2, 3).long(), "attention_mask": mask}]).read())
    assert torch.equal(read[0].mask, mask.bool())
    assert torch.equal(token_rows(read[0].mask, torch.zeros(2, 4, 3, 8), 3, "attn", 0),
                       mask.bool()[:, None, :].expand(2, 4, 3).reshape(-1))  # (batch, heads, seq, dim)
    with pytest.raises(CalibrationError, match=r"batch 0 is padded .* node 'conv' of shape \[2, 5, 7\]"):
        token_rows(read[0].mask, torch.zeros(2, 5, 7), 1, "conv", 0)
