"""torchvision's fx-wrapped functions (Swin's window attention, relative position bias, patch merging)
and einsum attention (MaxViT): whole heads at the fx level, exact; the same modules at the export level,
where they decompose into ATen ops."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from torchvision.models.swin_transformer import (PatchMerging, ShiftedWindowAttention,
                                                  ShiftedWindowAttentionV2)
from torchvision.models.video.swin_transformer import ShiftedWindowAttention3d

import fxprune
from fxprune.testing.check import check_pruned



def image(shape=(2, 3, 8, 8)):
    return torch.randn(shape, generator=torch.Generator().manual_seed(0))


class WindowBlock(nn.Module):
    """Conv stem -> channels-last window attention (4 heads of 4, shifted) -> patch merging -> head.

    No LayerNorm on the attention's path, so pruning heads is exact end to end."""

    def __init__(self, attention=ShiftedWindowAttention, shift=(2, 2)):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 16, 1)
        self.attn = attention(16, [4, 4], list(shift), num_heads=4)
        self.merge = PatchMerging(16, norm_layer=nn.Identity)
        self.head = nn.Linear(32, 5)

    def forward(self, x):
        h = self.stem(x).permute(0, 2, 3, 1)
        h = h + self.attn(h)
        return self.head(self.merge(h).mean((1, 2)))


class EinsumAttention(nn.Module):
    """MaxViT's einsum spelling of attention: q·k over head dims, weights·v over tokens."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.qkv = nn.Linear(16, 48)
        self.merge = nn.Linear(16, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q, k, v = (t.reshape(b, n, 2, 8).permute(0, 2, 1, 3) for t in (q, k, v))
        weights = torch.einsum("b h i d, b h j d -> b h i j", q, k * 8 ** -0.5).softmax(-1)
        out = torch.einsum("bhij,bhjd->bhid", weights, v).permute(0, 2, 1, 3).reshape(b, n, c)
        return self.head(self.merge(out) + x)


def test_window_attention_prunes_whole_heads_fx():
    report = check_pruned(WindowBlock().eval(), (image(),), capture="fx")
    assert report.verify.exact and report.verify.max_abs_error < 1e-5
    gm = report.result.graph_module
    assert gm.get_parameter("attn.qkv.weight").shape == (24, 8)  # 2 of 4 heads of 4, q k v
    assert gm.get_parameter("attn.proj.weight").shape == (8, 8)
    assert gm.get_parameter("attn.relative_position_bias_table").shape == (49, 2)
    assert gm.get_parameter("merge.reduction.weight").shape[1] == 32  # 4 neighbours x 8 kept channels
    call = next(n for n in gm.graph.nodes if getattr(n.target, "__name__", "") == "shifted_window_attention")
    assert call.args[5] == 2  # the head count is rewritten in the graph


def test_window_attention_v2_prunes_per_head_scale_and_bias_mlp_fx():
    report = check_pruned(WindowBlock(ShiftedWindowAttentionV2).eval(), (image(),), capture="fx")
    assert report.verify.exact and report.verify.max_abs_error < 1e-5
    gm = report.result.graph_module
    assert gm.get_parameter("attn.logit_scale").shape == (2, 1, 1)
    assert gm.get_parameter("attn.cpb_mlp.2.weight").shape == (2, 256)  # its hidden layer too


@pytest.mark.parametrize("attention", [ShiftedWindowAttention, ShiftedWindowAttentionV2])
def test_window_attention_export(attention):
    report = check_pruned(WindowBlock(attention).eval(), (image(),), capture="export")
    assert report.verify.exact


class VideoWindowBlock(nn.Module):
    """Swin3d's window attention (4 heads of 4, shifted in time and space) on a Conv3d stem."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv3d(3, 16, 1)
        self.attn = ShiftedWindowAttention3d(16, [2, 4, 4], [1, 2, 2], num_heads=4)
        self.merge = PatchMerging(16, norm_layer=nn.Identity)
        self.head = nn.Linear(32, 5)

    def forward(self, x):
        h = self.stem(x).permute(0, 2, 3, 4, 1)  # B, T, H, W, C
        h = h + self.attn(h)
        return self.head(self.merge(h).mean((1, 2, 3)))


def test_video_window_attention_prunes_whole_heads(prune_checked, level):
    # fx: one wrapped call (its list arguments are edited in place by the function: capture hands it
    # plain lists); export: the decomposed ATen ops
    report = prune_checked(VideoWindowBlock().eval(), image((1, 3, 4, 8, 8)), level, sparsity=0.5)
    assert report.verify.exact and report.verify.max_abs_error < 1e-5
    gm = report.result.graph_module
    assert gm.get_parameter("attn.qkv.weight").shape == (24, 8)
    if level == "fx":  # whole heads: the wrapped call's num_heads is 2 of 4
        call = next(n for n in gm.graph.nodes if "shifted_window_attention_3d" in str(n.target))
        assert call.args[5] == 2
    else:  # head dims: the reshape of qkv's output into (3, heads, head dim) holds 4 heads of 2
        qkv = next(n for n in gm.graph.nodes if n.target == torch.ops.aten.linear.default
                   and n.args[1].target == "attn.qkv.weight")
        assert [list(u.args[1])[-3:] for u in qkv.users] == [[3, 4, 2]]


def test_window_attention_unshifted_fx():
    check_pruned(WindowBlock(shift=(0, 0)).eval(), (image(),), capture="fx")


def test_einsum_attention_prunes_head_dims(level):
    report = check_pruned(EinsumAttention().eval(), (torch.randn(2, 5, 16),), capture=level)
    assert report.verify.exact
    kept = report.result.plan.kept_indices["qkv.weight"][0]
    # q, k and v head dims all shrink alike (export passes the operands as a list: the mask of the
    # contraction goes before the permute that feeds it)
    assert len(kept) == 24 and len([i for i in kept if i < 16]) == 8


def test_einsum_contraction_is_masked_by_verify():
    analysis = fxprune.analyze(EinsumAttention().eval(), (torch.randn(2, 5, 16),), "fx")
    sinks = [s for s in analysis.act_sinks if s.node.startswith("einsum")]
    assert [(s.node, s.arg, s.dim) for s in sinks] == [("einsum", 1, 3)]


class ListEinsum(EinsumAttention):
    """q and k reach the einsum through exp (not a relayout): their contraction cannot be masked.
    (split, not chunk: a chunk's pieces keep equal sizes, so with q and k whole v would stay whole too.)"""

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).split(16, dim=-1)
        q, k, v = (t.reshape(b, n, 2, 8).permute(0, 2, 1, 3) for t in (q, k, v))
        weights = torch.einsum("bhid,bhjd->bhij", [q.exp(), k.exp()]).softmax(-1)
        out = torch.einsum("bhij,bhjd->bhid", [weights, v]).permute(0, 2, 1, 3).reshape(b, n, c)
        return self.head(self.merge(out) + x)


def test_einsum_list_operands_without_relayout_freeze_the_contraction():
    report = check_pruned(ListEinsum().eval(), (torch.randn(2, 5, 16),), capture="export")
    kept = report.result.plan.kept_indices["qkv.weight"][0]
    assert [i for i in kept if i < 32] == list(range(32))  # q and k whole
    assert any("operands passed as a list" in r for g in report.result.groups for r in g.reasons)


# --- the ATen spellings Swin decomposes into: roll, new_zeros, index, vector norms ----------------
class RollGatherNorm(nn.Module):
    """A cyclic shift over space, a mask from new_zeros, a gathered table, a normalised branch."""

    def __init__(self, roll_channels: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.roll_channels = roll_channels
        self.conv = nn.Conv2d(3, 8, 1)
        self.table = nn.Parameter(torch.randn(9, 8))
        self.register_buffer("index", torch.tensor([0, 4, 8, 2]))
        self.side = nn.Conv2d(3, 8, 1)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        h = self.conv(x)
        h = torch.roll(h, shifts=(1, 1) if not self.roll_channels else (1,), dims=(2, 3) if not
                       self.roll_channels else (1,))
        mask = h.new_zeros((4, 4))
        bias = self.table[self.index].t().reshape(1, 8, 2, 2).repeat(1, 1, 2, 2)
        n = torch.nn.functional.normalize(self.side(x), dim=1)
        return self.head(h + bias + mask) + n.sum()


def test_roll_index_and_new_zeros_pass_channels(level):
    x = image((1, 3, 4, 4))
    report = check_pruned(RollGatherNorm().eval(), (x,), capture=level)
    assert report.verify.exact
    groups = {g.name: g for g in report.result.groups}
    assert groups["conv"].prunable and not groups["conv"].frozen_units  # table's columns tied to it
    assert report.result.graph_module.get_parameter("table").shape == (9, 4)
    assert not groups["side"].prunable  # normalize over channels freezes them
    assert any("a norm over a channel dim" in r for r in groups["side"].reasons)


def test_roll_along_channels_freezes_them(level):
    analysis = fxprune.analyze(RollGatherNorm(roll_channels=True).eval(), (image((1, 3, 4, 4)),), level)
    conv = next(g for g in analysis.groups if g.name == "conv")
    assert not conv.prunable and any("a roll along a channel dim" in r for r in conv.reasons)


class IndexSelect(nn.Module):
    """index_select over rows (channels pass) or over channels (they freeze)."""

    def __init__(self, dim: int):
        super().__init__()
        torch.manual_seed(0)
        self.dim = dim
        self.conv = nn.Conv2d(3, 8, 1)
        self.head = nn.Conv2d(4 if dim == 1 else 8, 4, 1)
        self.register_buffer("rows", torch.tensor([3, 0, 1, 1]))

    def forward(self, x):
        return self.head(self.conv(x).index_select(self.dim, self.rows))


def test_index_select_over_rows_passes_channels(level):
    report = check_pruned(IndexSelect(2).eval(), (image((1, 3, 4, 4)),), capture=level)
    assert report.result.graph_module.get_parameter("conv.weight").shape[0] == 4


def test_index_select_over_channels_freezes_them(level):
    analysis = fxprune.analyze(IndexSelect(1).eval(), (image((1, 3, 4, 4)),), level)
    conv = next(g for g in analysis.groups if g.name == "conv")
    assert not conv.prunable and any("gathered by a tensor index" in r for r in conv.reasons)
