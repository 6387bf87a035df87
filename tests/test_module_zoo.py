"""fxprune.module on real clients: torchvision detectors (pruned through their traceable parts),
segmentation models, classifiers and timm families (traced whole), each the same class back and checked.

Detectors: the pruned model's eval outputs (boxes, scores, labels, masks, keypoints) must equal those of
the masked reference (the original with every dropped channel's consumer weights zeroed) on a fixed input,
where NMS keeps the same boxes: random weights give near-equal scores whose order float noise may swap, so
boxes are compared where a detection's score is isolated.
"""
from __future__ import annotations

import copy

import numpy

import pytest
import torch
import torchvision
from torch import nn

import fxprune.module
from fxprune.errors import ModuleForwardError
from fxprune.core.verify import reference_model

pytestmark = pytest.mark.zoo

DETECTORS = {
    "fasterrcnn_mobilenet_v3_large_fpn": "box_score_thresh",
    "fasterrcnn_resnet50_fpn": "box_score_thresh",
    "retinanet_resnet50_fpn": "score_thresh",
    "fcos_resnet50_fpn": "score_thresh",
    "ssd300_vgg16": "score_thresh",
    "ssdlite320_mobilenet_v3_large": "score_thresh",
    "maskrcnn_resnet50_fpn": "box_score_thresh",
    "keypointrcnn_resnet50_fpn": "box_score_thresh",
}


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def detector(name: str) -> nn.Module:
    """A detector with random weights, small images, and every score kept (random scores are low)."""
    options = {"weights": None, "weights_backbone": None, "num_classes": 3 if "keypoint" not in name else 2,
               DETECTORS[name]: 0.0}
    if not name.startswith("ssd"):
        options.update(min_size=128, max_size=160)
    return getattr(torchvision.models.detection, name)(**options).eval()


def masked_reference(model: nn.Module, out) -> nn.Module:
    """The original model with the joined graph's reference tensors (dropped consumer columns zeroed)."""
    reference = copy.deepcopy(model)
    state = reference_model(out.result.analysis, out.result.drop).state_dict()
    unknown = set(state) - set(reference.state_dict())
    assert not unknown, unknown  # the joined graph is keyed by the model's own names
    reference.load_state_dict(state, strict=False)
    return reference


def _rows(detections: dict) -> torch.Tensor:
    """One row per detection: score, label, box, and a sum per mask / keypoint set; rows sorted by their
    rounded values (random weights give many equal scores, whose order float noise may swap)."""
    columns = [detections["scores"][:, None], detections["labels"][:, None].float(), detections["boxes"]]
    columns += [detections[k].flatten(1).float().sum(1, keepdim=True) for k in ("masks", "keypoints")
                if k in detections]
    rows = torch.cat(columns, 1).double()
    order = numpy.lexsort(rows.round(decimals=2).numpy().T[::-1])
    return rows[torch.from_numpy(order.copy())]


def assert_same_detections(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    torch.testing.assert_close(_rows(got), _rows(want), rtol=1e-3, atol=2e-3)


GROUP_NORM_HEADS = ("fcos_resnet50_fpn",)  # their reference recomputes GroupNorm over kept channels only


#: Detectors whose run is the long tail of this file (Keypoint R-CNN: ~40 s): ``pytest --heavy`` runs them.
HEAVY_DETECTORS = {"keypointrcnn_resnet50_fpn"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.heavy) if n in HEAVY_DETECTORS else n
                                  for n in DETECTORS if n not in GROUP_NORM_HEADS])
def test_detector_same_class_equals_masked_reference(name):
    torch.manual_seed(0)
    model = detector(name)
    images = [torch.rand(3, 128, 160)]
    out = fxprune.module.prune_parts(model, (images,), sparsity=0.5)
    assert type(out.module) is type(model)
    assert "backbone" in out.parts
    assert _params(out.module) < 0.8 * _params(model)
    with torch.no_grad():
        got, want = out.module(images)[0], masked_reference(model, out)(images)[0]
    assert len(got["boxes"]) > 0
    assert_same_detections(got, want)


@pytest.mark.parametrize("name", GROUP_NORM_HEADS)
def test_group_norm_detector_same_class_equals_its_pruned_graph(name):
    """FCOS's head normalises with GroupNorm: its masked reference recomputes the statistics over kept
    channels in the graph, which no weights can hold, so the check is against the pruned joined graph."""
    torch.manual_seed(0)
    model = detector(name)
    images = [torch.rand(3, 128, 160)]
    out = fxprune.module.prune_parts(model, (images,), sparsity=0.5)
    assert type(out.module) is type(model) and "head" in out.parts
    assert _params(out.module) < 0.8 * _params(model) and out.max_abs_error < 1e-4
    with torch.no_grad():
        assert len(out.module(images)[0]["boxes"]) > 0


SEGMENTATION = ["deeplabv3_mobilenet_v3_large", "lraspp_mobilenet_v3_large", "fcn_resnet50"]
CLASSIFIERS = ["resnet18", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0", "regnet_y_400mf",
               "squeezenet1_1", "convnext_tiny", "mnasnet0_5", "resnext50_32x4d"]


@pytest.mark.parametrize("name", SEGMENTATION)
def test_segmentation_same_class(name):
    model = getattr(torchvision.models.segmentation, name)(weights=None, weights_backbone=None,
                                                           num_classes=4).eval()
    x = torch.randn(1, 3, 64, 64)
    out = fxprune.module.prune(model, (x,), sparsity=0.5)
    assert type(out.module) is type(model) and _params(out.module) < 0.6 * _params(model)
    assert out.module(x)["out"].shape == (1, 4, 64, 64)


@pytest.mark.parametrize("sparsity", [0.3, 0.5])
def test_shufflenet_whose_forward_halves_its_channels_comes_back(sparsity):
    """ShuffleNetV2's blocks ``chunk(2)`` their input and run one half through a branch: the halves keep
    equal widths (a chunk's pieces drop in lockstep), so its own forward's chunk splits where the plan's
    pieces end, at 30% as at 50%."""
    model = torchvision.models.shufflenet_v2_x0_5(num_classes=10).eval()
    x = torch.randn(1, 3, 64, 64)
    out = fxprune.module.prune(model, (x,), sparsity=sparsity)
    assert type(out.module) is type(model) and _params(out.module) < (0.7 if sparsity == 0.3 else 0.4) * _params(model)
    assert out.max_abs_error < 1e-3
    assert out.result.analysis.locksteps


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_classifier_same_class(name):
    model = getattr(torchvision.models, name)(num_classes=10).eval()
    x = torch.randn(1, 3, 64, 64)
    out = fxprune.module.prune(model, (x,), sparsity=0.5)
    assert type(out.module) is type(model) and _params(out.module) < 0.7 * _params(model)
    assert out.max_abs_error < 1e-3


TIMM = ["resnet18", "efficientnet_b0", "mobilenetv3_small_100", "convnext_atto", "regnetx_002", "mixer_s16_224",
        "ghostnet_100", "dla34", "repvgg_a0", "resnest14d", "lcnet_050", "fbnetc_100"]
PATCHED = ("vit", "deit", "mixer")  # fixed position embeddings: built for 64x64 images


@pytest.mark.parametrize("name", TIMM)
def test_timm_same_class(name):
    timm = pytest.importorskip("timm")
    options = {"img_size": 64} if name.startswith(PATCHED) else {}
    model = timm.create_model(name, pretrained=False, num_classes=10, **options).eval()
    x = torch.randn(1, 3, 64, 64)
    out = fxprune.module.prune(model, (x,), sparsity=0.5)
    assert type(out.module) is type(model) and _params(out.module) < 0.8 * _params(model)
    assert out.max_abs_error < 1e-3


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "rexnet_100", "cspresnet50"])
def test_timm_forward_that_bakes_a_width_is_refused(name):
    """timm's Attention reshapes its output with the input's width (``reshape(B, N, C)``), RexNet adds a
    shortcut into ``x[:, 0:self.in_channels]``, CSPNet splits by ``self.expand_chs // 2``: the own forward
    cannot hold the plan, so the error names the module and points to the graph result."""
    timm = pytest.importorskip("timm")
    options = {"img_size": 64} if name.startswith(PATCHED) else {}
    model = timm.create_model(name, pretrained=False, num_classes=10, **options).eval()
    with pytest.raises(ModuleForwardError, match="result.graph_module"):
        fxprune.module.prune(model, (torch.randn(1, 3, 64, 64),), sparsity=0.5)
