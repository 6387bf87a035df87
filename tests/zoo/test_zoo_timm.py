"""The timm zoo: a representative subset of ``benchmarks/zoo.py --source timm`` prunes at 50% (L1,
uniform, classifier kept) and keeps every promise (``check_pruned``), under the ``zoo`` marker.

The subset covers a CNN (ResNet), a mobile net (EfficientNet), a hybrid conv-attention net (CoAtNet),
a ViT that ``symbolic_trace`` cannot capture (its ``CaptureError`` names the line and suggests
``capture="export"``), and the families whose fixes this zoo found: CoaT (a Conv1d across stacked
class tokens), LeViT (``reshape_as``) and CaiT (views sized from ``x.shape`` at the fx level).
``python benchmarks/zoo.py --source timm`` runs every family (``benchmarks/zoo_timm.md``).
Models and inputs come from ``benchmarks/zoo.py`` (random weights, constant parameters jittered), so
the test and the table prune exactly the same thing.
"""
from __future__ import annotations

import gc

import pytest

from fxprune.testing.check import check_pruned
from fxprune.errors import CaptureError
from zoo_script import ZOO

timm = pytest.importorskip("timm")


CASES = [("test_resnet", "fx"), ("test_resnet", "export"), ("test_efficientnet", "fx"),
         ("test_efficientnet", "export"), ("test_coatnet", "fx"), ("test_coatnet", "export"),
         ("test_vit", "export"), ("coat_tiny", "fx"), ("coat_tiny", "export"), ("levit_128s", "export"),
         ("cait_xxs24_224", "fx")]


@pytest.fixture(autouse=True)
def _free_memory():
    yield
    gc.collect()


@pytest.mark.zoo
@pytest.mark.parametrize("name, level", CASES, ids=[f"{n}-{lv}" for n, lv in CASES])
def test_timm_family_prunes_and_verifies(name: str, level: str):
    model, inputs = ZOO.build(name, "timm")
    report = check_pruned(model, inputs, capture=level, sparsity=0.5, criterion="l1", deterministic=False)
    assert report.params_after < 0.9 * report.params_before, "the model barely shrank"


@pytest.mark.zoo
def test_untraceable_family_names_the_line_and_suggests_export():
    model, inputs = ZOO.build("test_vit", "timm")
    with pytest.raises(CaptureError, match=r"timm/layers/pos_embed\.py:\d+ `.*capture='export'"):
        check_pruned(model, inputs, capture="fx", sparsity=0.5)


def test_one_model_per_timm_family():
    assert set(ZOO.TIMM_MODELS) == set(timm.list_modules())
    assert all(name in timm.list_models(module=family) for family, name in ZOO.TIMM_MODELS.items())
    assert {name for name, _ in CASES} <= set(ZOO.TIMM_MODELS.values())
