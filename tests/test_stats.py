"""Tests of fxprune.measure: parameter and MAC counts, memory/time measurement."""
from __future__ import annotations

import doctest
import json
import subprocess
import sys

import pytest

import torch
from torch import nn

from fxprune import measure as stats
from fxprune.errors import ExampleInputError
from fxprune.measure import count_macs, count_params, current_rss_mb, measure, peak_rss_mb


def test_linear_params() -> None:
    assert count_params(nn.Linear(4, 3)) == 15
    assert count_params(nn.Linear(4, 3, bias=False)) == 12


def test_shared_parameters_counted_once() -> None:
    lin = nn.Linear(4, 4)
    assert count_params(nn.Sequential(lin, nn.ReLU(), lin)) == 20


def test_tied_parameter_under_two_names_counted_once() -> None:
    emb = nn.Embedding(10, 4)
    head = nn.Linear(4, 10, bias=False)
    head.weight = emb.weight
    assert count_params(nn.ModuleDict({"emb": emb, "head": head})) == 40


def test_buffers_are_not_params() -> None:
    assert count_params(nn.BatchNorm2d(8)) == 16  # weight + bias, not running stats


@pytest.mark.parametrize(
    ("cin", "cout", "k", "stride", "pad", "groups", "hw"),
    [(3, 16, 3, 1, 1, 1, 8), (8, 8, 3, 2, 0, 8, 9), (4, 6, 1, 1, 0, 2, 5), (3, 5, (3, 1), 1, 0, 1, 7)],
)
def test_conv_macs_match_formula(cin: int, cout: int, k, stride: int, pad: int, groups: int, hw: int) -> None:
    conv = nn.Conv2d(cin, cout, k, stride=stride, padding=pad, groups=groups).eval()
    x = torch.randn(2, cin, hw, hw)
    out = conv(x)
    kh, kw = conv.kernel_size
    expected = out.shape[0] * cout * out.shape[2] * out.shape[3] * (cin // groups) * kh * kw
    assert count_macs(conv, (x,)) == expected


def test_linear_and_attention_macs() -> None:
    assert count_macs(nn.Linear(4, 3).eval(), (torch.randn(5, 4),)) == 5 * 4 * 3
    # batched matmul: (2, 3, 4) @ (2, 4, 6)
    class Bmm(nn.Module):
        def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return a @ b

    assert count_macs(Bmm(), (torch.randn(2, 3, 4), torch.randn(2, 4, 6))) == 2 * 3 * 4 * 6


def test_cpu_attention_kernel_is_counted() -> None:
    class Attention(nn.Module):
        def forward(self, q, k, v):
            return nn.functional.scaled_dot_product_attention(q, k, v)

    q, kv = torch.randn(2, 4, 5, 8), torch.randn(2, 4, 7, 8)
    assert count_macs(Attention(), (q, kv, kv)) == 2 * (2 * 4 * 5 * 7 * 8)  # scores, then the mix


@pytest.mark.parametrize("heads", [1, 2, 4])
def test_multihead_attention_macs_do_not_depend_on_the_head_count(heads: int) -> None:
    # in eval an even head count takes MHA's fused fast path, which FlopCounterMode does not see
    batch, tokens, dim = 2, 5, 8
    mha = nn.MultiheadAttention(dim, heads, batch_first=True).eval()
    x = torch.randn(batch, tokens, dim)

    class SelfAttention(nn.Module):
        def forward(self, x):
            return mha(x, x, x, need_weights=False)[0]

    projections = 4 * batch * tokens * dim * dim  # q, k, v and out
    scores_and_mix = 2 * batch * tokens * tokens * dim
    assert count_macs(SelfAttention(), (x,)) == projections + scores_and_mix
    assert torch.backends.mha.get_fastpath_enabled()  # restored


def test_training_mode_module_is_not_mutated() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    assert model.training
    before = {k: v.clone() for k, v in model.state_dict().items()}
    macs = count_macs(model, (torch.randn(2, 3, 6, 6) * 5 + 3,))
    assert macs == 2 * 4 * 4 * 4 * 3 * 3 * 3
    assert model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_eval_and_train_counts_agree() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5), nn.Flatten(), nn.Linear(64, 2))
    x = (torch.randn(1, 3, 6, 6),)
    assert count_macs(model.train(), x) == count_macs(model.eval(), x)


def test_kwargs_are_passed() -> None:
    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor, twice: bool = False) -> torch.Tensor:
            return self.lin(self.lin(x)) if twice else self.lin(x)

    m = Scaled().eval()
    x = (torch.randn(1, 4),)
    assert count_macs(m, x, {"twice": True}) == 2 * count_macs(m, x)


def test_bad_inputs_are_typed_errors() -> None:
    lin = nn.Linear(4, 3).eval()
    with pytest.raises(ExampleInputError, match="tuple"):
        count_macs(lin, torch.randn(1, 4))  # type: ignore[arg-type]
    with pytest.raises(ExampleInputError, match="Linear"):
        count_macs(lin, (torch.randn(1, 5),))
    with pytest.raises(TypeError):
        count_params("not a module")  # type: ignore[arg-type]


def test_torchvision_resnet18_counts() -> None:
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet18().eval()
    assert count_params(model) == 11_689_512
    # the usual published figure is 1.82 GMACs at 224x224
    assert count_macs(model, (torch.randn(1, 3, 224, 224),)) == 1_814_073_344


def test_rss_helpers_positive() -> None:
    assert peak_rss_mb() > 0
    rss = current_rss_mb()
    assert rss is None or 0 < rss <= peak_rss_mb() + 1


_ALLOCATE_IN_A_FRESH_PROCESS = """
import json, time, torch
from fxprune.measure import measure
with measure(interval_s=0.001) as m:
    x = torch.ones(64, 1024, 1024)  # 256 MiB, touched
    x.add_(1)
    time.sleep(0.05)  # hold it while the sampler thread (which needs the GIL) takes a reading
    del x
print(json.dumps([m.wall_s, m.maxrss_start_mb, m.maxrss_mb, m.rss_start_mb, m.peak_delta_mb]))
"""


def test_measure_sees_a_tensor_allocation() -> None:
    # A fresh interpreter: in a long pytest run malloc may serve 256 MiB from heap pages that an
    # earlier test freed but that are still resident, and RSS would rightly not move.
    done = subprocess.run(
        [sys.executable, "-c", _ALLOCATE_IN_A_FRESH_PROCESS],
        capture_output=True, text=True, check=True, timeout=120,
    )
    wall_s, maxrss_start_mb, maxrss_mb, rss_start_mb, peak_delta_mb = json.loads(done.stdout)
    assert wall_s > 0
    assert maxrss_mb >= maxrss_start_mb
    if rss_start_mb is not None:  # Linux
        assert peak_delta_mb is not None and peak_delta_mb > 200


def test_measure_records_time_on_exception() -> None:
    with pytest.raises(RuntimeError):
        with measure() as m:
            raise RuntimeError("boom")
    assert m.wall_s >= 0 and m.maxrss_mb > 0
    with pytest.raises(ValueError):
        with measure(interval_s=0):
            pass


def test_docstring_examples() -> None:
    result = doctest.testmod(stats, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0
