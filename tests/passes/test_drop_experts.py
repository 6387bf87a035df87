"""drop-experts: whole MoE experts removed with their router rows, exactly, at both levels — a toy MoE
written as a loop over an ``nn.ModuleList`` (dense masks, or ``one_hot`` + ``index_add_``) and
transformers' stacked experts (Mixtral, OLMoE, Qwen2-MoE, Qwen3-MoE) — equal to the original whose router
never picks them; the criteria drop the expert they should; bad input gets a typed error."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fxprune.core.capture import capture
from fxprune.core.experts import find_experts
from fxprune.errors import CalibrationError, InvalidOptionError
from fxprune.passes import DropExperts
from fxprune.passes.drop_experts import DROPPED_KEY, verify_experts
from fxprune.passes.pipeline import Pipeline

X = torch.randn(2, 5, 16)


class Expert(nn.Module):
    def __init__(self, width: int = 16, hidden: int = 24) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(width, hidden), nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x)))


class SparseMoE(nn.Module):
    """The common way (transformers' Mixtral before v5): ``one_hot`` masks, ``where``, ``index_add_``."""

    def __init__(self, width: int = 16, experts: int = 4, top_k: int = 2) -> None:
        super().__init__()
        self.num_experts, self.top_k = experts, top_k
        self.gate = nn.Linear(width, experts)  # a router with a bias: its rows go too
        self.experts = nn.ModuleList(Expert(width) for _ in range(experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        h = x.reshape(-1, width)
        probs = F.softmax(self.gate(h), dim=-1)
        weights, chosen = torch.topk(probs, self.top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        out = torch.zeros_like(h)
        mask = F.one_hot(chosen, num_classes=self.num_experts).permute(2, 1, 0)
        for e in range(self.num_experts):
            slot, token = torch.where(mask[e])
            out.index_add_(0, token, self.experts[e](h[token]) * weights[token, slot, None])
        return out.reshape(batch, length, width)


class DenseMoE(SparseMoE):
    """Every expert on every token, weighted by its gate (zero where not chosen)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, chosen = self.gate(x).softmax(-1).topk(self.top_k, -1)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            out = out + (weights * (chosen == e)).sum(-1, keepdim=True) * expert(x)
        return out


class LogitsMoE(SparseMoE):
    """A dense MoE that also returns its router logits (for an auxiliary loss)."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.gate(x)
        weights, chosen = logits.softmax(-1).topk(self.top_k, -1)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            out = out + (weights * (chosen == e)).sum(-1, keepdim=True) * expert(x)
        return out, logits


class TwoLayers(nn.Module):
    """A residual stack of two MoE layers, the second returning its router logits (a graph output)."""

    def __init__(self) -> None:
        super().__init__()
        self.moe1, self.moe2 = SparseMoE(), LogitsMoE()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = x + self.moe1(x)
        out, logits = self.moe2(h)
        return h + out, logits


MOES = {"sparse": SparseMoE, "dense": DenseMoE}


def _removed_keys(gm, expert: int) -> list[str]:
    return [k for k in gm.state_dict() if k.startswith(f"experts.{expert}.")]


@pytest.mark.parametrize("level", ["fx", "export"])
@pytest.mark.parametrize("case", MOES.keys())
def test_named_experts_go_exactly(case: str, level: str, run_pure, graph_snapshot) -> None:
    gm = capture(MOES[case]().eval(), (X,), level).gm
    [layer] = find_experts(gm).layers
    assert (layer.kind, layer.num_experts, layer.top_k) == ("lanes", 4, 2)
    result = run_pure(DropExperts(experts=("1",)), gm)
    out = result.graph_module
    assert out == graph_snapshot
    assert result.modified and out.meta[DROPPED_KEY]["dropped"] == {"gate": [1]}
    assert _removed_keys(out, 1) == [] and _removed_keys(gm, 1)
    assert out.get_parameter("gate.weight").shape == (3, 16) and out.get_parameter("gate.bias").shape == (3,)
    report = verify_experts(gm, out, (torch.randn(3, 5, 16),))
    assert report.passed and report.max_abs_error < 1e-5 and report.max_abs_drift > 1e-2


@pytest.mark.parametrize("level", ["fx", "export"])
def test_the_result_prunes_again(level: str) -> None:
    gm = capture(SparseMoE().eval(), (X,), level).gm
    once = DropExperts(experts=("0",))(gm).graph_module
    [layer] = find_experts(once).layers
    assert layer.num_experts == 3
    twice = DropExperts(experts=("2",))(once).graph_module  # the original's expert 3
    assert twice.get_parameter("gate.weight").shape == (2, 16)
    reference = DropExperts(experts=("0", "3"))(gm).graph_module
    x = torch.randn(3, 5, 16)
    torch.testing.assert_close(twice(x), reference(x))


@pytest.mark.parametrize("level", ["fx", "export"])
def test_half_precision(level: str) -> None:
    gm = capture(SparseMoE().eval().to(torch.bfloat16), (X.bfloat16(),), level).gm
    out = DropExperts(count=1, criterion="weight-norm")(gm).graph_module
    assert out.get_parameter("gate.weight").dtype == torch.bfloat16
    assert verify_experts(gm, out, (torch.randn(3, 5, 16).bfloat16(),)).passed


def test_a_router_read_elsewhere_is_not_a_candidate() -> None:
    gm = capture(TwoLayers().eval(), (X,)).gm
    found = find_experts(gm)
    assert found.names == ("moe1",)
    [(name, why)] = found.rejected
    assert name == "moe2" and "read elsewhere" in why
    out = DropExperts(experts=("moe1:2",))(gm).graph_module
    assert out.meta[DROPPED_KEY]["rejected"] == [[name, why]]
    assert out.get_parameter("moe2.gate.weight").shape == (4, 16)
    assert verify_experts(gm, out, (X,)).passed


class ScaledMoE(DenseMoE):
    """Gate values scaled by the expert count, a literal the pass has no rule to rewrite."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, chosen = self.gate(x).softmax(-1).topk(self.top_k, -1)
        weights = weights * self.num_experts
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            out = out + (weights * (chosen == e)).sum(-1, keepdim=True) * expert(x)
        return out


@pytest.mark.parametrize("level", ["fx", "export"])
def test_a_count_literal_without_a_rule_is_not_a_candidate(level: str) -> None:
    gm = capture(ScaledMoE().eval(), (X,), level).gm
    found = find_experts(gm)
    assert found.layers == ()
    [(name, why)] = found.rejected
    assert "holds the expert count 4 as a literal the pass has no rule to rewrite" in why
    with pytest.raises(InvalidOptionError, match="no MoE layer whose experts can be removed.*expert count 4"):
        DropExperts(experts=("1",))(gm)


def _biased(model: SparseMoE, quiet: int) -> SparseMoE:
    """Expert ``quiet`` tiny and rarely chosen: every criterion should drop it."""
    with torch.no_grad():
        for p in model.experts[quiet].parameters():
            p.mul_(1e-3)
        model.gate.bias[quiet] = -100.0
    return model


@pytest.mark.parametrize("criterion", ["weight-norm", "frequency", "reap"])
@pytest.mark.parametrize("level", ["fx", "export"])
def test_every_criterion_drops_the_quiet_expert(criterion: str, level: str) -> None:
    gm = capture(_biased(SparseMoE().eval(), 2), (X,), level).gm
    calibration = [torch.randn(2, 5, 16) for _ in range(3)]
    out = DropExperts(count=1, criterion=criterion).with_calibration(calibration)(gm).graph_module
    record = out.meta[DROPPED_KEY]
    assert record["dropped"] == {"gate": [2]} and record["criterion"] == criterion
    assert min(range(4), key=lambda i: record["scores"]["gate"][i]) == 2
    assert verify_experts(gm, out, (X,)).passed


def test_frequency_counts_every_routed_token() -> None:
    gm = capture(DenseMoE().eval(), (X,)).gm
    calibration = [torch.randn(2, 5, 16) for _ in range(2)]
    out = DropExperts(count=1, criterion="frequency").with_calibration(calibration)(gm).graph_module
    assert sum(out.meta[DROPPED_KEY]["scores"]["gate"]) == 2 * 2 * 5 * 2  # batches x rows x length x top-k


def test_random_is_seeded() -> None:
    gm = capture(DenseMoE().eval(), (X,)).gm
    runs = [DropExperts(count=2, criterion="random", seed=s)(gm).graph_module.meta[DROPPED_KEY]["dropped"]
            for s in (0, 0, 1)]
    assert runs[0] == runs[1] and all(len(d["gate"]) == 2 for d in runs)


def test_the_pipeline_spec_round_trips() -> None:
    spec = "drop-experts{sparsity=0.25,criterion=frequency}"
    assert str(Pipeline.parse(spec)) == spec
    gm = capture(_biased(SparseMoE().eval(), 3), (X,)).gm
    out = Pipeline.parse(spec)(gm, calibration=[X]).graph_module
    assert out.meta[DROPPED_KEY]["dropped"] == {"gate": [3]}


def test_bad_input_gets_typed_errors() -> None:
    gm = capture(SparseMoE().eval(), (X,)).gm
    with pytest.raises(InvalidOptionError, match="keep 1 experts, fewer than its top-k 2"):
        DropExperts(count=3, criterion="weight-norm")(gm)
    with pytest.raises(InvalidOptionError, match="cannot remove all 4 experts"):
        DropExperts(experts=("0", "1", "2", "3"))(gm)
    with pytest.raises(InvalidOptionError, match="has 4 experts: no expert \\[7\\]"):
        DropExperts(experts=("7",))(gm)
    with pytest.raises(InvalidOptionError, match="'moe9': no such MoE layer"):
        DropExperts(experts=("moe9:1",))(gm)
    with pytest.raises(InvalidOptionError, match="unknown expert criterion 'cos'"):
        DropExperts(criterion="cos")
    with pytest.raises(InvalidOptionError, match="sparsity must be in"):
        DropExperts(sparsity=1.0)
    with pytest.raises(CalibrationError, match="with_calibration"):
        DropExperts(count=1, criterion="reap")(gm)
    plain = capture(Expert().eval(), (X,)).gm
    with pytest.raises(InvalidOptionError, match="no MoE layer"):
        DropExperts(count=1, criterion="weight-norm")(plain)


# --- transformers' stacked experts (export level) --------------------------------------------------------
FAMILIES = ("mixtral", "olmoe", "qwen2_moe", "qwen3_moe")


def _hf(name: str, layers: int = 2):
    pytest.importorskip("transformers")
    from fxprune.testing.hf_models import tiny_model
    model = tiny_model(name, layers=layers)
    return capture(model, (_ids(2, 8),), "export").gm


def _ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 100, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_mixtral_experts_go_exactly(run_pure, graph_snapshot) -> None:
    gm = _hf("mixtral", layers=1)
    [layer] = find_experts(gm).layers
    assert (layer.name, layer.kind, layer.counts) == ("model.layers.0.mlp", "stacked", ("histc",))
    result = run_pure(DropExperts(experts=("1",)), gm)
    out = result.graph_module
    assert out == graph_snapshot
    shapes = {k: tuple(v.shape) for k, v in out.state_dict().items() if ".mlp." in k}
    assert shapes == {"model.layers.0.mlp.gate.weight": (3, 32), "model.layers.0.mlp.experts.gate_up_proj": (3, 128, 32),
                      "model.layers.0.mlp.experts.down_proj": (3, 32, 64)}
    report = verify_experts(gm, out, (_ids(3, 11, seed=7),))
    assert report.passed and report.max_abs_error < 1e-5 and report.max_abs_drift > 1e-4


@pytest.mark.parametrize("criterion", ["weight-norm", "frequency"])
@pytest.mark.parametrize("name", FAMILIES)
def test_half_the_stacked_experts_go_exactly(name: str, criterion: str) -> None:
    gm = _hf(name)
    calibration = [_ids(2, 8, seed) for seed in range(1, 3)]
    out = DropExperts(sparsity=0.5, criterion=criterion).with_calibration(calibration)(gm).graph_module
    dropped = out.meta[DROPPED_KEY]["dropped"]
    assert sorted(dropped) == ["model.layers.0.mlp", "model.layers.1.mlp"] and all(len(d) == 2 for d in dropped.values())
    for layer in find_experts(out).layers:
        assert layer.num_experts == 2
        assert all(out.get_parameter(k).shape[0] == 2 for k in layer.stacked)
    if name == "qwen2_moe":  # the shared expert stays
        assert out.get_parameter("model.layers.0.mlp.shared_expert.gate_proj.weight").shape == (40, 32)
    assert verify_experts(gm, out, (_ids(3, 11, seed=7),)).passed


def test_stacked_experts_keep_top_k() -> None:
    gm = _hf("olmoe", layers=1)
    with pytest.raises(InvalidOptionError, match="keep 1 experts, fewer than its top-k 2"):
        DropExperts(count=3, criterion="weight-norm")(gm)
    with pytest.raises(InvalidOptionError, match="cannot remove all 4 experts"):
        DropExperts(experts=("0", "1", "2", "3"))(gm)


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe"])
def test_graph_scores_equal_the_adapters(name: str) -> None:
    """reap and frequency read from the exported graph equal fxprune.hf's, read with module hooks."""
    pytest.importorskip("transformers")
    from fxprune.data.expert_criteria import expert_scores
    from fxprune.hf.experts import expert_scores as module_scores
    from fxprune.testing.hf_models import tiny_model
    model = tiny_model(name, layers=2)
    gm = capture(model, (_ids(2, 8),), "export").gm
    calibration = [_ids(2, 8, seed) for seed in range(1, 3)]
    for criterion in ("reap", "frequency"):
        graph = expert_scores(gm, find_experts(gm), criterion, calibration)
        modules = module_scores(model, [(x,) for x in calibration], criterion)
        assert graph.keys() == modules.keys()
        for key in graph:
            torch.testing.assert_close(graph[key], modules[key].double(), rtol=1e-5, atol=1e-7)


def test_reap_drops_a_stacked_expert_that_writes_nothing() -> None:
    pytest.importorskip("transformers")
    from fxprune.testing.hf_models import tiny_model
    model = tiny_model("mixtral", layers=2)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.experts.down_proj[2].zero_()
    gm = capture(model, (_ids(2, 8),), "export").gm
    calibration = [_ids(4, 8, seed) for seed in range(3)]
    out = DropExperts(count=1, criterion="reap").with_calibration(calibration)(gm).graph_module
    assert out.meta[DROPPED_KEY]["dropped"] == {f"model.layers.{i}.mlp": [2] for i in range(2)}
    assert verify_experts(gm, out, (_ids(3, 11, seed=7),)).passed


def test_frequency_leaves_padding_out() -> None:
    gm = _hf("olmoe", layers=1)
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 5:] = 0  # 13 real tokens
    batch = {"input_ids": _ids(2, 8), "attention_mask": mask}
    out = DropExperts(count=1, criterion="frequency").with_calibration([batch])(gm).graph_module
    assert sum(out.meta[DROPPED_KEY]["scores"]["model.layers.0.mlp"]) == 13 * 2  # real tokens x top-k
    with pytest.raises(CalibrationError, match="padded"):
        DropExperts(count=1, criterion="reap").with_calibration([batch])(gm)
