"""fxprune.module.prune_parts: models not traceable whole, pruned through their traceable parts.

The real clients (ultralytics YOLO, torchvision detectors) are in the zoo marker; the small model here
has the same shape of problem: a Python loop with data-dependent control flow around ordinary layers.
"""
from __future__ import annotations

import copy
import os

import pytest
import torch
from torch import nn

import fxprune
import fxprune.module
from fxprune.errors import InvalidOptionError


class Looped(nn.Module):
    """A stem, blocks run in a loop that tests the data (untraceable), a neck fed by two blocks, a head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 16, 1)) for _ in range(2))
        self.neck = Neck()
        self.head = nn.Conv2d(24, 4, 1)

    def forward(self, x):
        x = self.stem(x)
        features = []
        for block in self.blocks:
            if bool(x.abs().sum() >= 0):  # data-dependent: no tracer follows it
                x = block(x)
                features.append(x)
        return self.head(self.neck(features[0], features[1])).flatten(1).softmax(-1)


class Neck(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(16, 24, 1), nn.Conv2d(16, 24, 1)

    def forward(self, low, high):
        return (self.a(low) + self.b(high)).relu()


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_channels_are_tied_across_parts_and_kept_where_code_reads_them():
    torch.manual_seed(0)
    model = Looped().eval()
    x = torch.randn(2, 3, 16, 16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = fxprune.module.prune_parts(model, (x,), sparsity=0.5)
    assert out.parts == ("stem", "blocks.0", "blocks.1", "neck", "head")
    assert type(out.module) is Looped
    small = out.module
    # blocks' outputs feed the neck (a part) and the loop's test (untraced): kept, with the reason
    assert small.blocks[0][2].out_channels == 16
    assert "untraced" in out.crossings["blocks.0 output 0"]
    assert small.blocks[0][0].out_channels == 16  # inside a part: pruned
    # the neck's output feeds only the head (another part): the channels are tied across and pruned
    assert small.neck.a.out_channels == small.neck.b.out_channels == small.head.in_channels == 12
    assert "neck output 0" not in out.crossings
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert small(x).shape == (2, 4 * 16 * 16)
    assert out.max_abs_error < 1e-4


def test_named_parts():
    model = Looped().eval()
    out = fxprune.module.prune_parts(model, (torch.randn(1, 3, 8, 8),), sparsity=0.5, modules=["neck", "head"])
    assert out.parts == ("neck", "head")
    assert out.module.neck.a.out_channels == 12 and out.module.stem[0].out_channels == 16
    with pytest.raises(InvalidOptionError, match="blocks"):
        fxprune.module.prune_parts(model, (torch.randn(1, 3, 8, 8),), modules=["blocks"])


def test_prune_output_module_of_a_model_not_traceable_whole():
    model = Looped().eval()
    result = fxprune.prune(model, (torch.randn(1, 3, 8, 8),), sparsity=0.5, output="module")
    assert type(result.module) is Looped and result.module.neck.a.out_channels == 12


# --- ultralytics YOLO (AGPL-3.0: a test-only dependency, never imported by fxprune) -------------------
YOLO_CONFIGS = ["yolov8n.yaml", "yolov8n-seg.yaml", "yolov8n-pose.yaml", "yolo11n.yaml", "yolo11n-seg.yaml",
                "yolo11n-pose.yaml"]


def _yolo_batch(config: str) -> dict:
    batch = {"img": torch.rand(2, 3, 64, 64), "batch_idx": torch.tensor([0.0, 1.0]),
             "cls": torch.tensor([[0.0], [0.0]]),  # the pose models have one class
             "bboxes": torch.tensor([[0.5, 0.5, 0.4, 0.4], [0.3, 0.3, 0.2, 0.3]])}
    if "seg" in config:
        batch["masks"] = torch.zeros(2, 16, 16)
    if "pose" in config:
        batch["keypoints"] = torch.rand(2, 17, 3)
    return batch


@pytest.mark.zoo
@pytest.mark.parametrize("config", YOLO_CONFIGS)
def test_yolo_same_class_trains_and_exports(config, tmp_path, monkeypatch):
    ultralytics = pytest.importorskip("ultralytics")
    from ultralytics.cfg import get_cfg

    torch.manual_seed(0)
    yolo = ultralytics.YOLO(config, verbose=False)
    model = yolo.model.eval().requires_grad_(False)  # as a checkpoint loads: nothing trainable
    x = torch.rand(1, 3, 64, 64)
    out = fxprune.module.prune_parts(model, (x,), sparsity=0.5)
    small = out.module
    assert type(small) is type(model)
    assert _params(small) < 0.4 * _params(model)
    assert out.max_abs_error < 1e-4
    # one training step with ultralytics' own loss
    trained = copy.deepcopy(small)
    trained.args = get_cfg()
    trained.train().requires_grad_(True)
    optimizer = torch.optim.SGD(trained.parameters(), lr=0.01)
    loss, _ = trained.loss(_yolo_batch(config))
    loss.sum().backward()
    first = trained.model[0].conv.weight.detach().clone()
    optimizer.step()
    assert all(p.grad is not None for n, p in trained.named_parameters() if ".dfl." not in n)  # DFL: fixed
    assert not torch.equal(trained.model[0].conv.weight, first)
    # ultralytics' own ONNX export of the pruned model, run by ONNX Runtime
    onnxruntime = pytest.importorskip("onnxruntime")
    monkeypatch.chdir(tmp_path)
    yolo.model = small
    path = yolo.export(format="onnx", imgsz=64, device="cpu", simplify=False)
    session = onnxruntime.InferenceSession(os.fspath(path))
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        want = small.eval()(x)
    want = torch.utils._pytree.tree_leaves(want)[0]  # the first output: the detections
    torch.testing.assert_close(torch.from_numpy(got), want, rtol=1e-3, atol=1e-3)


@pytest.mark.zoo
@pytest.mark.parametrize("config", ["yolov8n.yaml", "yolo11n.yaml"])
def test_yolo_same_class_at_30_percent_trains(config):
    """At 30% the halves of C2f's ``chunk(2, 1)`` and C2PSA's ``split((self.c, self.c), 1)``, and the
    width YOLO11's Attention reads from ``x.shape`` for ``v``, would come out unequal; they drop in
    lockstep, so the class comes back, checked, and trains."""
    ultralytics = pytest.importorskip("ultralytics")
    from ultralytics.cfg import get_cfg

    torch.manual_seed(0)
    model = ultralytics.YOLO(config, verbose=False).model.eval().requires_grad_(False)
    out = fxprune.module.prune_parts(model, (torch.rand(1, 3, 64, 64),), sparsity=0.3)
    small = out.module
    assert type(small) is type(model) and out.max_abs_error < 1e-4
    assert _params(small) < 0.6 * _params(model)
    assert out.result.analysis.locksteps
    trained = copy.deepcopy(small)
    trained.args = get_cfg()
    trained.train().requires_grad_(True)
    optimizer = torch.optim.SGD(trained.parameters(), lr=0.01)
    loss, _ = trained.loss(_yolo_batch(config))
    loss.sum().backward()
    first = trained.model[0].conv.weight.detach().clone()
    optimizer.step()
    assert not torch.equal(trained.model[0].conv.weight, first)
