"""Mixture-of-experts: experts stacked in 3-D parameters prune their intermediate width exactly.

Intermediate index i is one unit across every expert of a layer (gate row i, up row I + i, down column
i of each expert), so the stacked tensors stay rectangular and an HF config can hold the new width. The
experts dim stays (routing reads it). Cases: a hand-written layer run as transformers' ``batched_mm``
(experts gathered per token, ``bmm``) and as ``grouped_mm`` (tokens sorted by expert), at both levels;
tiny Mixtral (both implementations) and Qwen2-MoE at the export level.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxprune
from fxprune.testing.check import check_pruned

HIDDEN, INTER, EXPERTS, TOP_K = 16, 12, 4, 2


class BatchedExperts(nn.Module):
    """A top-2 MoE layer between two linears; each token's experts gathered and applied with bmm."""

    def __init__(self, hidden: int = HIDDEN, inter: int = INTER):
        super().__init__()
        self.inp, self.out = nn.Linear(8, hidden), nn.Linear(hidden, 5)
        self.router = nn.Linear(hidden, EXPERTS, bias=False)
        self.gate_up = nn.Parameter(torch.randn(EXPERTS, 2 * inter, hidden) * 0.3)
        self.down = nn.Parameter(torch.randn(EXPERTS, hidden, inter) * 0.3)

    def forward(self, x):
        h = self.inp(x)
        weights, experts = torch.topk(torch.softmax(self.router(h), dim=-1), TOP_K, dim=-1)
        chosen = experts.reshape(-1)
        tokens = h.repeat_interleave(TOP_K, dim=0)
        gate, up = torch.bmm(self.gate_up[chosen], tokens.unsqueeze(-1)).squeeze(-1).chunk(2, dim=-1)
        y = torch.bmm(self.down[chosen], (F.silu(gate) * up).unsqueeze(-1)).squeeze(-1)
        y = (y * weights.reshape(-1, 1)).view(-1, TOP_K, y.shape[-1]).sum(1)
        return self.out(h + y)


class GroupedExperts(BatchedExperts):
    """The same layer with tokens sorted by expert and one ``F.grouped_mm`` per projection (bf16: the
    only dtype ``torch.export`` traces grouped_mm in)."""

    def forward(self, x):
        h = self.inp(x)
        weights, experts = torch.topk(torch.softmax(self.router(h), dim=-1), TOP_K, dim=-1)
        chosen, order = torch.sort(experts.reshape(-1), stable=True)
        tokens = h[order // TOP_K]
        offs = torch.cumsum(torch.histc(chosen.float(), bins=EXPERTS, min=0, max=EXPERTS - 1), 0).int()
        gate, up = F.grouped_mm(tokens, self.gate_up.transpose(-2, -1), offs=offs).chunk(2, dim=-1)
        y = F.grouped_mm(F.silu(gate) * up, self.down.transpose(-2, -1), offs=offs)
        y = y * weights.reshape(-1)[order].unsqueeze(-1)
        y = torch.zeros_like(h).index_add(0, order // TOP_K, y)
        return self.out(h + y)


def _check_experts(gm, inter_kept: int, hidden_kept: int) -> None:
    assert tuple(gm.get_parameter("gate_up").shape) == (EXPERTS, 2 * inter_kept, hidden_kept)
    assert tuple(gm.get_parameter("down").shape) == (EXPERTS, hidden_kept, inter_kept)


def test_batched_experts_prune_exactly(prune_checked, level):
    torch.manual_seed(0)
    report = prune_checked(BatchedExperts().eval(), torch.randn(6, 8), level, sparsity=0.5)
    assert report.verify.exact and report.verify.max_abs_error < 1e-5
    _check_experts(report.result.graph_module, INTER // 2, HIDDEN // 2)


def test_grouped_experts_prune_exactly(prune_checked, level):
    torch.manual_seed(0)
    model = GroupedExperts(hidden=32, inter=32).eval().to(torch.bfloat16)
    x = torch.randn(6, 8, dtype=torch.bfloat16)
    report = prune_checked(model, x, level, sparsity=0.5, round_to=8)  # grouped_mm: 16-byte strides
    assert report.verify.exact and report.verify.passed
    gm = report.result.graph_module
    assert tuple(gm.get_parameter("gate_up").shape) == (EXPERTS, 32, 16)
    assert tuple(gm.get_parameter("down").shape) == (EXPERTS, 16, 16)


def test_one_unit_is_an_intermediate_index_of_every_expert(level):
    torch.manual_seed(0)
    analysis = fxprune.analyze(BatchedExperts().eval(), torch.randn(6, 8), level)
    group = next(g for g in analysis.groups if any((m.key, m.dim) == ("gate_up", 1) for m in g.members))
    assert group.size == INTER and group.prunable and group.exact
    assert {(m.key, m.dim) for m in group.members} == {("gate_up", 1), ("down", 2)}
    router = next(g for g in analysis.groups if g.name == "router")  # the experts dim stays: routing
    assert not router.prunable


def test_pruned_experts_keep_the_same_indices_in_gate_up_and_down():
    torch.manual_seed(0)
    model = BatchedExperts().eval()
    result = fxprune.prune(model, torch.randn(6, 8), sparsity={"gate_up": 0.5}, capture="export")
    kept = result.plan.kept_indices
    inter = kept["down"][2]
    assert kept["gate_up"] == {1: inter + tuple(i + INTER for i in inter)}  # gate row i with up row I + i
    x = torch.randn(6, 8)
    expected = BatchedExperts().eval()  # the original, its experts sliced by hand
    expected.load_state_dict(model.state_dict())
    with torch.no_grad():
        rows = torch.tensor(kept["gate_up"][1])
        expected.gate_up = nn.Parameter(model.gate_up[:, rows])
        expected.down = nn.Parameter(model.down[:, :, torch.tensor(inter)])
        torch.testing.assert_close(result.graph_module(x), expected(x), rtol=1e-5, atol=1e-6)


# --- transformers 5.x: Mixtral and Qwen2-MoE at the export level ---------------------------------
transformers = pytest.importorskip("transformers")


def _mixtral(inter: int = 24):
    config = transformers.MixtralConfig(vocab_size=64, hidden_size=16, intermediate_size=inter,
                                        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                        num_local_experts=EXPERTS, num_experts_per_tok=TOP_K,
                                        max_position_embeddings=16, use_cache=False)
    return transformers.MixtralForCausalLM(config).eval()


def _qwen2_moe(inter: int = 24):
    config = transformers.Qwen2MoeConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                         moe_intermediate_size=inter, shared_expert_intermediate_size=20,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                         num_experts=EXPERTS, num_experts_per_tok=TOP_K,
                                         max_position_embeddings=16, use_cache=False)
    return transformers.Qwen2MoeForCausalLM(config).eval()


HF = {"mixtral": (_mixtral, "intermediate_size"), "qwen2_moe": (_qwen2_moe, "moe_intermediate_size")}
EXPERTS_ONLY = {"model.layers.*.mlp.experts": 0.5}
#: The experts also produce the residual stream (their down projections' rows): keep it whole here.
KEEP_STREAM = ["model.embed_tokens"]


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(HF))
def test_hf_experts_prune_exactly_to_a_width_the_config_holds(graph_snapshot, name):
    # the pruned graph verifies exactly and computes what the same class built with intermediate width
    # 12 computes when given the plan's slices: one width for every expert, a config can hold it
    build, field = HF[name]
    torch.manual_seed(0)
    model, ids = build(), torch.randint(0, 64, (2, 6))
    report = check_pruned(model, (ids,), capture="export", sparsity=EXPERTS_ONLY, ignore=KEEP_STREAM,
                           deterministic=False)
    assert report.verify.exact and report.verify.max_abs_error < 1e-4
    result = report.result
    assert result.graph_module == graph_snapshot(name="export")
    assert set(result.plan.kept_indices) == {"model.layers.0.mlp.experts.gate_up_proj",
                                             "model.layers.0.mlp.experts.down_proj"}
    assert not any("experts" in key for key in result.plan.ungrouped)
    smaller = build(inter=12)
    assert getattr(smaller.config, field) == 12
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for key, dims in result.plan.kept_indices.items():
        for dim, kept in dims.items():
            state[key] = state[key].index_select(dim, torch.tensor(kept))
    smaller.load_state_dict(state)
    with torch.no_grad():
        expected = smaller(ids).logits
        logits = result.graph_module(ids)[0]  # a ModelOutput (export keeps the output's pytree): logits first
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_hf_batched_mm_experts_prune_exactly():
    # transformers' other implementation: each token's experts gathered (gate_up_proj[expert_ids]), bmm
    torch.manual_seed(0)
    model = _mixtral()
    model.config._experts_implementation = "batched_mm"
    report = check_pruned(model, (torch.randint(0, 64, (2, 6)),), capture="export", sparsity=0.5,
                          ignore=KEEP_STREAM, deterministic=False)
    assert report.verify.exact and report.verify.max_abs_error < 1e-4
    gm = report.result.graph_module
    assert [n.target for n in gm.graph.nodes if "bmm" in str(n.target)] == [torch.ops.aten.bmm.default] * 2
    assert tuple(gm.get_parameter("model.layers.0.mlp.experts.gate_up_proj").shape)[:2] == (EXPERTS, 24)
    assert tuple(gm.get_parameter("model.layers.0.mlp.experts.down_proj").shape)[::2] == (EXPERTS, 12)
