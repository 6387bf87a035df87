"""Attention rules: nn.MultiheadAttention by whole heads (fx), scaled_dot_product_attention with its
scale kept, hand-written attention through the view/matmul rules, and a small torchvision ViT."""
from __future__ import annotations

import math
import operator

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models import VisionTransformer

import fxprune
from fxprune.testing.check import check_pruned



def build(factory, *args):
    torch.manual_seed(0)
    return factory(*args).eval()


def tokens(shape=(2, 5, 6)):
    return torch.randn(shape, generator=torch.Generator().manual_seed(0))


class MHABlock(nn.Module):
    """Embed -> residual nn.MultiheadAttention (4 heads of 4) -> residual MLP -> pooled head."""

    def __init__(self, need_weights: bool = False, average: bool = True):
        super().__init__()
        self.need_weights, self.average = need_weights, average
        self.embed = nn.Linear(6, 16)
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        h = self.embed(x)
        a, w = self.attn(h, h, h, need_weights=self.need_weights, average_attn_weights=self.average)
        h = h + a
        h = h + self.mlp(h)
        out = self.head(h.mean(1))
        return out if not self.need_weights else (out, w.sum())


class WeightsOut(MHABlock):
    def __init__(self):
        super().__init__(need_weights=True)


class PerHeadWeights(MHABlock):
    """Per-head attention weights [N, heads, L, S] feed a Linear over heads: heads prune through it."""

    def __init__(self):
        super().__init__(need_weights=True, average=False)
        self.gain = nn.Linear(4, 3)

    def forward(self, x):
        h = self.embed(x)
        a, w = self.attn(h, h, h, need_weights=True, average_attn_weights=False)
        return self.head((h + a).mean(1)) + self.gain(w.mean((2, 3)))


class HandAttention(nn.Module):
    """Hand-written multi-head attention: packed qkv, view to heads, attention, reshape back, out."""

    def __init__(self, kind: str = "sdpa"):
        super().__init__()
        self.kind = kind
        self.qkv = nn.Linear(16, 48)
        self.out = nn.Linear(16, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        B, L, C = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, 4, C // 4).permute(2, 0, 3, 1, 4)
        if self.kind == "sdpa":
            y = F.scaled_dot_product_attention(q, k, v)
        else:  # a literal scale does not change when the head dim shrinks
            y = (q @ k.transpose(-2, -1) * 0.5).softmax(-1) @ v
        y = self.out(y.transpose(1, 2).reshape(B, L, C))
        return self.head((x + y).mean(1))


class SizeScaled(nn.Module):
    """Separate projections; the scale is computed from the head dim's size at run time."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16)
        self.out = nn.Linear(16, 3)

    def forward(self, x):
        B, L, C = x.shape
        q, k, v = (p(x).view(B, L, 4, C // 4).transpose(1, 2) for p in (self.q, self.k, self.v))
        attn = (q @ k.transpose(-2, -1) * q.size(-1) ** -0.5).softmax(-1)
        return self.out((attn @ v).transpose(1, 2).reshape(B, L, C).mean(1))


def tiny_vit():
    torch.manual_seed(0)
    model = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=32,
                              mlp_dim=64, num_classes=10)
    with torch.no_grad():  # torchvision zero-initialises the head and class token: make them count
        model.heads.head.weight.normal_(0, 0.2)
        model.class_token.normal_(0, 0.2)
    return model.eval()


CASES = {
    "mha_block": (lambda: build(MHABlock), lambda: tokens()),
    "hand_sdpa": (lambda: build(HandAttention, "sdpa"), lambda: tokens((2, 5, 16))),
    "hand_matmul": (lambda: build(HandAttention, "matmul"), lambda: tokens((2, 5, 16))),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_attention_prunes_and_verifies(prune_checked, case, level):
    model, inputs = CASES[case]
    report = prune_checked(model(), inputs(), level, sparsity=0.5)
    assert report.verify.exact and report.verify.max_abs_error < 1e-5


def test_mha_heads_are_units():
    analysis = fxprune.analyze(build(MHABlock), tokens())
    group = next(g for g in analysis.groups if g.name == "embed")  # the residual stream
    assert group.size == 4 and group.exact
    root = analysis.solution.root
    rows = root[analysis.params["attn.in_proj_weight"][0]].view(3, 4, 4)  # (q/k/v, head, head_dim)
    assert torch.equal(rows, rows[:1, :, :1].expand(3, 4, 4))
    assert rows[0, :, 0].unique().numel() == 4
    stream = root[analysis.params["embed.weight"][0]]
    assert torch.equal(stream, rows[0].reshape(-1))  # residual position i*d + j belongs to head i
    assert torch.equal(root[analysis.params["attn.out_proj.weight"][1]], stream)


def test_exported_heads_keep_a_dynamic_batch():
    # export writes MHA's batch * heads as sym_size * 4: pruning heads scales it in the graph
    # (sym_size * 4 // 2), where a literal would have baked the example's batch of 2 into the views
    model = build(MHABlock)
    result = fxprune.prune(model, tokens(), 0.5, capture="export")
    assert any(n.target is operator.floordiv for n in result.graph_module.graph.nodes)
    for batch in (1, 3):
        x = tokens((batch, 5, 6))
        reference = fxprune.verify(model, result, (x,))
        assert reference.passed and reference.exact, str(reference)


def test_mha_is_rewritten_with_fewer_heads():
    gm = fxprune.prune(build(MHABlock), tokens(), 0.5).graph_module
    attn = gm.attn
    assert (attn.embed_dim, attn.num_heads, attn.head_dim, attn.kdim, attn.vdim) == (8, 2, 4, 8, 8)
    assert (attn.out_proj.in_features, attn.out_proj.out_features) == (8, 8)
    assert tuple(attn.in_proj_weight.shape) == (24, 8)


def test_mha_averaged_weights_in_use_freeze_heads():
    analysis = fxprune.analyze(build(WeightsOut), tokens())
    group = next(g for g in analysis.groups if g.name == "embed")
    assert not group.prunable and any("averaged attention weights" in r for r in group.reasons)


def test_mha_per_head_weights_carry_heads():
    report = check_pruned(build(PerHeadWeights), tokens())
    assert report.verify.exact and report.verify.max_abs_error < 1e-5
    assert report.result.graph_module.gain.in_features == 2


def test_mha_with_kdim_is_unsupported():
    class Cross(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.kv = nn.Linear(4, 8), nn.Linear(4, 6)
            self.attn = nn.MultiheadAttention(8, 2, kdim=6, vdim=6)

        def forward(self, x):
            return self.attn(self.q(x), self.kv(x), self.kv(x))[0]

    analysis = fxprune.analyze(build(Cross), tokens((5, 2, 4)))
    kv = next(g for g in analysis.groups if g.name == "kv")
    assert not kv.prunable and "kdim" in kv.reasons[0]


def test_sdpa_keeps_the_original_scale(level):
    result = fxprune.prune(build(HandAttention, "sdpa"), tokens((2, 5, 16)), 0.5, capture=level)
    sdpa = next(n for n in result.graph_module.graph.nodes if "scaled_dot_product" in str(n.target))
    assert sdpa.kwargs["scale"] == 1 / math.sqrt(4)  # head_dim 4 -> 2, the scale stays 1/sqrt(4)
    assert sdpa.args[0].meta["val"].shape[-1] == 2


def test_size_computed_scale_freezes_head_dims():
    # q.size(-1) ** -0.5 would change when the head dim shrinks: the head dims stay
    analysis = fxprune.analyze(build(SizeScaled), tokens((2, 5, 16)))
    group = next(g for g in analysis.groups if g.name == "q")
    assert not group.prunable and "tensor arithmetic" in group.reasons[0]


def test_size_computed_scale_prunes_whole_heads():
    # split_axis="outer" prunes whole heads: q.size(-1) keeps its value and the result stays exact
    report = check_pruned(build(SizeScaled), tokens((2, 5, 16)), split_axis="outer")
    assert report.verify.exact and report.verify.max_abs_error < 1e-5
    assert tuple(report.result.graph_module.q.weight.shape) == (8, 16)


def test_size_computed_scale_is_a_literal_at_export():
    report = check_pruned(build(SizeScaled), tokens((2, 5, 16)), capture="export")
    assert report.verify.exact and report.verify.max_abs_error < 1e-5


def test_vision_transformer(prune_checked, level):
    model, x = tiny_vit(), torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    report = prune_checked(model, x, level, sparsity=0.5)
    # LayerNorm over the pruned stream: its statistics run over the kept channels, as in the reference
    assert not report.verify.exact and report.verify.max_abs_error < 1e-4
    assert report.verify.max_abs_drift > 10 * report.verify.max_abs_error
    assert report.params_after < report.params_before / 2
    gm = report.result.graph_module
    assert gm(x).shape == (2, 10)
    if level == "fx":  # the residual stream is tied to the heads: 2 of 4 heads of 8 remain
        attn = gm.encoder.layers.encoder_layer_0.self_attention
        assert (attn.embed_dim, attn.num_heads, attn.head_dim) == (16, 2, 8)


# --- nn.Transformer layers: traced into at the fx level --------------------------------------------
class Encoder(nn.Module):
    """An nn.TransformerEncoder of two post-norm layers (4 heads of 4), mean-pooled into a head."""

    def __init__(self, norm_first: bool = False):
        super().__init__()
        self.embed = nn.Linear(6, 16)
        layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True, norm_first=norm_first)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.encoder(self.embed(x)).mean(1))


class EncoderDecoder(nn.Module):
    """An encoder layer over ``memory`` and an nn.TransformerDecoder (with a final norm) over ``x``,
    the decoder called with a causal mask when ``causal``."""

    def __init__(self, causal: bool = False):
        super().__init__()
        self.causal = causal
        self.embed, self.memory = nn.Linear(6, 16), nn.Linear(6, 16)
        self.encoder = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True,
                                                  activation="gelu")
        layer = nn.TransformerDecoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
        self.decoder = nn.TransformerDecoder(layer, 2, norm=nn.LayerNorm(16))
        self.head = nn.Linear(16, 3)

    def forward(self, x, y):
        mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1]) if self.causal else None
        return self.head(self.decoder(self.embed(x), self.encoder(self.memory(y)), tgt_mask=mask).mean(1))


def _called_modules(gm):
    return {n.target for n in gm.graph.nodes if n.op == "call_module"}


def test_transformer_stacks_are_traced_into_at_fx():
    gm = fxprune.capture(build(EncoderDecoder), (tokens(), tokens((2, 4, 6))), "fx").gm
    called = _called_modules(gm)
    assert not called & {"encoder", "decoder", "decoder.layers.0", "decoder.layers.1"}
    assert {"encoder.self_attn", "decoder.layers.1.multihead_attn", "decoder.layers.0.linear2",
            "decoder.norm"} <= called
    assert torch.backends.mha.get_fastpath_enabled()  # switched off only while a layer is traced


@pytest.mark.parametrize("norm_first", [False, True])
def test_transformer_encoder_prunes_feed_forward_exactly(prune_checked, norm_first):
    # The residual stream (and the heads tied to it) is left whole, so only exact groups prune: the
    # traced plain path equals the original model, which runs the fused fast path in eval mode.
    report = prune_checked(build(Encoder, norm_first), tokens(), "fx", sparsity=0.5, ignore=("embed",),
                           snapshot=not norm_first)
    assert report.verify.exact and report.verify.max_abs_error < 1e-5
    gm = report.result.graph_module
    assert [gm.get_submodule(f"encoder.layers.{i}.linear1").out_features for i in (0, 1)] == [16, 16]


def test_transformer_encoder_prunes_heads_and_the_stream():
    report = check_pruned(build(Encoder), tokens(), sparsity=0.5)
    attn = report.result.graph_module.get_submodule("encoder.layers.1.self_attn")
    assert (attn.num_heads, attn.embed_dim) == (2, 8)
    # LayerNorm over a pruned stream: checked against the kept-channel statistics reference
    assert not report.verify.exact and report.verify.max_abs_error < 1e-4


def test_transformer_decoder_prunes_at_fx():
    report = check_pruned(build(EncoderDecoder), (tokens(), tokens((2, 4, 6))), sparsity=0.5,
                          ignore=("embed",))
    gm = report.result.graph_module
    assert gm.get_submodule("decoder.layers.0.linear1").out_features == 16
    assert gm.get_submodule("encoder.linear1").out_features == 16


def test_transformer_called_with_a_mask_stays_a_leaf():
    analysis = fxprune.analyze(build(EncoderDecoder, True), (tokens(), tokens((2, 4, 6))))
    assert "decoder" in _called_modules(analysis.gm)
    group = next(g for g in analysis.groups if g.name == "embed")
    assert not group.prunable and "no rule for module decoder" in group.reasons[0]
