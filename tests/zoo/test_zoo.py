"""The torchvision classification zoo: every model prunes at 50% (L1, uniform, classifier kept) and
keeps every promise (``check_pruned``), at the fx level and at the export level.

- ``pytest -m zoo --heavy``: every model of ``torchvision.models.list_models(module=torchvision.models)``
  at both levels (about 35 min on 2 cores). Plain ``pytest`` (what CI runs) leaves out the ``HEAVY``
  variants, the largest members of families whose smaller members run (about 14 min). The zoo checks run, output shape, shrink, verify, no
  silent gap (``fxprune.core.ungrouped.silent_gaps``) and the input left untouched; the rerun/plan round trip (``deterministic``) is checked on the default subset.
- default (``-m "not zoo"``): a handful of families at both levels with the full check, and a snapshot
  of the pruned graph's normalized report for one model per family.

Models and inputs come from ``benchmarks/zoo.py`` (random weights, eval mode, the smallest input each
family takes), so the tests and ``benchmarks/zoo.md`` prune exactly the same thing.
"""
from __future__ import annotations

import gc

import pytest
import torchvision

from fxprune.testing.check import check_pruned
from fxprune.core.ungrouped import silent_gaps
from zoo_script import ZOO

MODELS = torchvision.models.list_models(module=torchvision.models)
DEFAULT = ("resnet18", "mobilenet_v3_small", "shufflenet_v2_x0_5", "squeezenet1_0", "efficientnet_b0")
#: Models that ``torch.fx.symbolic_trace`` cannot capture (the fx level does not apply): none today.
NOT_FX_TRACEABLE: frozenset[str] = frozenset()
SNAPSHOTS = {("resnet18", "fx"), ("mobilenet_v3_small", "fx"), ("shufflenet_v2_x0_5", "fx"),
             ("shufflenet_v2_x0_5", "export"), ("squeezenet1_0", "fx"), ("densenet121", "fx")}


build = ZOO.build


@pytest.fixture(autouse=True)
def _free_memory():
    """Each zoo model is large: drop it (and its pruned copies) before the next test starts."""
    yield
    gc.collect()


def _check(name: str, level: str, deterministic: bool):
    if level == "fx" and name in NOT_FX_TRACEABLE:
        pytest.skip(f"torch.fx.symbolic_trace cannot capture {name}: the fx level does not apply")
    model, inputs = build(name)
    report = check_pruned(model, inputs, capture=level, sparsity=0.5, criterion="l1",
                          deterministic=deterministic)
    assert report.params_after < 0.9 * report.params_before, "the model barely shrank"
    gaps = silent_gaps(report.result.analysis)  # every tensor read: in a group, or listed with its reason
    assert not gaps, f"silent gaps: {gaps}"
    return report


#: The largest variants of families whose smaller members run by default (vit_b_16, regnet up to 8gf,
#: swin_t/swin_v2_t, efficientnet b0, b1 and v2_s, convnext_tiny, densenet121, resnet18-101, vgg11 and
#: vgg11_bn, resnext50, wide_resnet50_2): about 22 of the zoo's ~36 min on 2 cores, keeping CI inside its
#: 45 min. ``pytest --heavy`` runs them too.
HEAVY = frozenset({
    "vit_h_14", "vit_l_16", "vit_l_32", "vit_b_32", "swin_s", "swin_b", "swin_v2_s", "swin_v2_b",
    "regnet_y_128gf", "regnet_y_32gf", "regnet_y_16gf", "regnet_x_32gf", "regnet_x_16gf",
    "efficientnet_b5", "efficientnet_b6", "efficientnet_b7", "efficientnet_v2_m", "efficientnet_v2_l",
    "convnext_base", "convnext_large", "densenet161", "densenet169", "densenet201", "resnet152",
    "resnext101_32x8d", "resnext101_64x4d", "wide_resnet101_2", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn",
    "vgg19", "vgg19_bn", "efficientnet_b2", "efficientnet_b3", "efficientnet_b4", "convnext_small"})


@pytest.mark.zoo
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.heavy) if n in HEAVY else n for n in MODELS])
def test_zoo(name: str, level: str):
    _check(name, level, deterministic=False)


@pytest.mark.parametrize("name", DEFAULT)
def test_default_subset(name: str, level: str, graph_snapshot):
    report = _check(name, level, deterministic=True)
    assert report.verify.exact
    if (name, level) in SNAPSHOTS:
        assert report.result.graph_module == graph_snapshot


@pytest.mark.zoo
def test_densenet121_snapshot(graph_snapshot):
    report = _check("densenet121", "fx", deterministic=False)
    assert report.result.graph_module == graph_snapshot


def test_zoo_lists_every_model_once():
    assert len(MODELS) == len(set(MODELS)) >= 80
    assert set(DEFAULT) <= set(MODELS) and NOT_FX_TRACEABLE <= set(MODELS) and HEAVY <= set(MODELS)


@pytest.mark.zoo
@pytest.mark.heavy
@pytest.mark.parametrize("name", MODELS)
def test_every_classifier_comes_back_as_its_own_class(name: str):
    """``fxprune.module``: each classifier back as a smaller instance of its class, its own forward
    checked against the pruned graph (``pytest --heavy``; tests/test_module_zoo.py runs nine by default)."""
    import fxprune.module
    model, inputs = build(name)
    out = fxprune.module.prune(model, inputs, sparsity=0.5, criterion="l1")
    assert type(out.module) is type(model)
    assert sum(p.numel() for p in out.module.parameters()) < 0.9 * sum(p.numel() for p in model.parameters())
    assert out.max_abs_error < 1e-3
