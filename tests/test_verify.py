"""verify is exact for every model: the reference recomputes each norm's statistics over kept positions.

The kept-only statistics (fxprune.core.kept_norms) equal torch's ops on the sliced tensor; a pruned LayerNorm,
RMSNorm or GroupNorm(1) model equals the reference to float tolerance at both levels, and a wrong slice of
a norm's weight, or the statistics over all channels, fails; the drift from the original is reported
beside the verdict. A mean over a pruned dim (an RMS norm written by hand) has its reference too.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxprune
from fxprune.core.channels import Dropped
from fxprune.core import kept_norms as kept_only
from fxprune.testing.check import check_pruned
from fxprune.core.rewrite import rewrite
from fxprune.core.verify import compare, reference_model

KEEP = torch.tensor([0, 2, 3, 5])


def _keep(n: int, dim: int, ndim: int) -> torch.Tensor:
    mask = torch.zeros(n)
    mask[KEEP] = 1
    shape = [1] * ndim
    shape[dim] = n
    return mask.view(shape)


# --- the kept-only statistics equal torch's ops on the kept slice --------------------------------
def test_kept_layer_and_rms_norm_equal_torch_on_the_kept_slice():
    torch.manual_seed(0)
    x, w, b = torch.randn(3, 5, 6), torch.randn(6), torch.randn(6)
    keep = _keep(6, 2, 3)
    got = kept_only.kept_layer_norm(x, keep, 1, w, b, 1e-5)[..., KEEP]
    torch.testing.assert_close(got, F.layer_norm(x[..., KEEP], (4,), w[KEEP], b[KEEP], 1e-5))
    got = kept_only.kept_rms_norm(x, keep, 1, w, 1e-6)[..., KEEP]
    torch.testing.assert_close(got, F.rms_norm(x[..., KEEP], (4,), w[KEEP], 1e-6))
    out, mean, rstd = kept_only.kept_native_layer_norm(x, keep, 1, w, b, 1e-5)
    ref = torch.ops.aten.native_layer_norm(x[..., KEEP], [4], w[KEEP], b[KEEP], 1e-5)
    for a, r in zip((out[..., KEEP], mean, rstd), ref):
        torch.testing.assert_close(a, r)
    assert bool((out[..., [1, 4]] == 0).all())  # a dropped position carries nothing on


def test_kept_group_norm_handles_partial_and_empty_groups():
    torch.manual_seed(0)
    x, w, b = torch.randn(2, 8, 3, 3), torch.randn(8), torch.randn(8)
    keep = torch.tensor([1., 0., 1., 1., 0., 0., 0., 0.]).view(1, 8, 1, 1)  # group 0 partial, 1 empty
    got = kept_only.kept_group_norm(x, keep, 2, w, b, 1e-5)
    kept = [0, 2, 3]
    torch.testing.assert_close(got[:, kept], F.group_norm(x[:, kept], 1, w[kept], b[kept], 1e-5))
    assert torch.isfinite(got).all() and bool((got[:, 4:] == 0).all())


@pytest.mark.parametrize("correction", [0, 1])
def test_kept_moments_equal_torch_on_the_kept_slice(correction):
    torch.manual_seed(0)
    x = torch.randn(3, 6, 4)
    keep = _keep(6, 1, 3)
    torch.testing.assert_close(kept_only.kept_mean(x, keep, (1, 2), True), x[:, KEEP].mean((1, 2), True))
    torch.testing.assert_close(kept_only.kept_var(x, keep, 1, correction),
                               x[:, KEEP].var(1, correction=correction))
    std, mean = kept_only.kept_std_mean(x, keep, [1], correction, False)
    torch.testing.assert_close(std, x[:, KEEP].std(1, correction=correction))
    torch.testing.assert_close(mean, x[:, KEEP].mean(1))
    torch.testing.assert_close(kept_only.kept_normalize(x, keep, 2.0, 1)[:, KEEP],
                               F.normalize(x[:, KEEP], dim=1))
    torch.testing.assert_close(kept_only.kept_vector_norm(x, keep, 2, 1), x[:, KEEP].norm(dim=1))


# --- pruned norms equal the kept-only reference; a wrong one fails --------------------------------
class LayerNormMLP(nn.Module):
    def __init__(self, norm: nn.Module):
        super().__init__()
        self.fc1, self.norm, self.fc2 = nn.Linear(6, 16), norm, nn.Linear(16, 3)

    def forward(self, x):
        return self.fc2(self.norm(self.fc1(x)))


def _affine(norm: nn.Module) -> nn.Module:
    with torch.no_grad():  # non-trivial affine parameters, so a wrong slice shows
        for p in norm.parameters():
            p.uniform_(-2, 2)
    return norm


class HandRMSNorm(nn.Module):
    """An RMS norm written out, as HF's LLaMA and many timm models do."""

    def __init__(self, width: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))


NORMS = {"layernorm": lambda: nn.LayerNorm(16), "rmsnorm": lambda: nn.RMSNorm(16),
         "rmsnorm_by_hand": lambda: HandRMSNorm(16)}


@pytest.mark.parametrize("norm", sorted(NORMS))
def test_pruned_norm_equals_kept_statistics_reference(level, norm):
    torch.manual_seed(0)
    model, x = LayerNormMLP(_affine(NORMS[norm]())).eval(), torch.randn(8, 6)
    report = check_pruned(model, x, capture=level, sparsity=0.5).verify
    assert report.passed and not report.exact and report.max_abs_error < 1e-5
    assert report.max_abs_drift > 1e-2  # the original's statistics ran over every channel
    assert "drift from the original" in str(report)


def test_norm_of_a_norms_output(level):
    # Swin's stage ends: the second norm's kept-only counterpart reads the first one's
    torch.manual_seed(0)
    norms = nn.Sequential(_affine(nn.LayerNorm(16)), _affine(nn.LayerNorm(16)))
    report = check_pruned(LayerNormMLP(norms).eval(), torch.randn(8, 6), capture=level, sparsity=0.5).verify
    assert not report.exact and report.max_abs_error < 1e-5


def test_wrong_layer_norm_slice_fails_verify(level):
    torch.manual_seed(0)
    model, x = LayerNormMLP(_affine(nn.LayerNorm(16))).eval(), torch.randn(8, 6)
    result = fxprune.prune(model, x, 0.5, capture=level)
    kept = list(result.plan.kept_indices["norm.weight"][0])
    wrong = [i for i in range(16) if i not in kept]  # the dropped channels' weights instead
    params = dict(result.graph_module.named_parameters())
    with torch.no_grad():
        params["norm.weight"].copy_(model.norm.weight[wrong])
        params["norm.bias"].copy_(model.norm.bias[wrong])
    report = fxprune.verify(model, result, x)
    assert not report.passed, str(report)
    with pytest.raises(fxprune.errors.VerificationError, match="FAILED"):
        fxprune.verify(model, result, x, raise_on_failure=True)


def test_statistics_over_all_channels_fail_verify(level):
    # the pruned model's norm renormalised with the original's mean and variance: what "approximate"
    # used to let through unchecked
    torch.manual_seed(0)
    model, x = LayerNormMLP(_affine(nn.LayerNorm(16))).eval(), torch.randn(8, 6)
    result = fxprune.prune(model, x, 0.5, capture=level)
    kept = list(result.plan.kept_indices["fc1.weight"][0])
    full = model.norm(model.fc1(x))[:, kept].detach()

    class AllChannels(nn.Module):
        def forward(self, x):
            return nn.functional.linear(full, result.graph_module.get_parameter("fc2.weight"),
                                        result.graph_module.get_parameter("fc2.bias"))

    wrong = fxprune.api.PruneResult(AllChannels(), result.plan, result.analysis, result.drop,
                                    result.example_inputs)
    assert not fxprune.verify(model, wrong, x).passed


# --- a mean over a pruned dim: an RMS norm written by hand -----------------------------------------
class HandRMSNorm(nn.Module):
    def __init__(self, n: int):
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.5, 2, n))

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))


def test_mean_over_pruned_dim_has_an_exact_reference(level):
    # whether a rule lets channels through the mean is the rule's choice; the reference is exact for
    # any drop: drop fc1's first 8 units by hand, the rewritten mean runs over the kept 8 only
    torch.manual_seed(0)
    model, x = LayerNormMLP(HandRMSNorm(16)).eval(), torch.randn(8, 6)
    analysis = fxprune.analyze(model, x, level)
    assert any(s.kept_only is kept_only.kept_mean for s in analysis.norm_sites)
    group = next(g for g in analysis.groups if g.name == "fc1")
    mask = torch.zeros(analysis.solution.root.numel(), dtype=torch.bool)
    mask[list(group.units[:8])] = True
    drop = Dropped(mask)
    pruned = rewrite(analysis, drop)
    assert pruned.get_parameter("fc1.weight").shape == (8, 6)
    report = compare(reference_model(analysis, drop), pruned, (x,), exact=False, original=analysis.gm)
    assert report.passed and report.max_abs_error < 1e-5 and report.max_abs_drift > 1e-2


# --- propagate_bias through a padded consumer: checked, not waved through ------------------------
class Padded(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.bn, self.c2 = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        return self.c2(torch.relu(self.bn(self.c1(x))))


def test_folded_padded_consumer_is_verified(level):
    torch.manual_seed(0)
    model = Padded().eval()
    with torch.no_grad():
        model.c1.bias.uniform_(-2, 2)
    x = torch.randn(2, 3, 8, 8)
    report = check_pruned(model, x, capture=level, sparsity=0.5, propagate_bias=True).verify
    assert not report.exact and report.max_abs_error < 1e-5
    result = fxprune.prune(model, x, 0.5, capture=level, propagate_bias=True)
    with torch.no_grad():
        result.graph_module.get_parameter("c2.bias").add_(0.1)  # a wrong fold fails
    assert not fxprune.verify(model, result, x).passed


# --- exported graphs run in eval mode --------------------------------------------------------------
class _BnDropout(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.drop = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.bn(self.conv(x)))


def test_eval_copy_switches_an_exported_training_graph_to_eval():
    # an exported graph ignores .eval(): its batch_norm/dropout take the training flag as an argument (a
    # prepare_qat_pt2e graph is built so). verify's copy runs the eval-mode ops: running statistics, no
    # dropout, and the original's buffers untouched
    from fxprune.core.verify import eval_copy

    torch.manual_seed(0)
    model = _BnDropout().train()
    x = torch.randn(2, 3, 5, 5)
    gm = torch.export.export(model, (x,)).module()
    assert any(n.target == torch.ops.aten.batch_norm.default and n.args[5] is True for n in gm.graph.nodes)
    for module in gm.modules():  # as fxprune's capture does (export's module refuses eval()); the ops
        module.training = False  # keep their training flag
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    frozen = eval_copy(gm)
    assert frozen is not gm
    with torch.no_grad():
        torch.testing.assert_close(frozen(x), model.eval()(x))
        torch.testing.assert_close(frozen(x), frozen(x))
    assert all(torch.equal(before[k], v) for k, v in gm.state_dict().items())
