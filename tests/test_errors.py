"""Bad input gets a typed error from ``fxprune.errors`` that names the thing at fault, the input model
stays untouched, and nothing partial comes back. Each row here is a row of the README's table."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

import pytest
import torch
import torch.nn as nn

import fxprune
from fxprune import errors


class Net(nn.Module):
    def __init__(self, width: int = 8):
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.head = nn.Conv2d(width, 2, 1)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.conv(x))))


class Branchy(nn.Module):
    """Python control flow on a tensor value: symbolic_trace cannot follow it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        if x.sum() > 0:
            return self.conv(x)
        return x


class DataDependent(nn.Module):
    """A shape that depends on data: torch.export refuses it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        return self.conv(x)[:, : int(x.abs().sum().item()) % 3 + 1]


class FixedBatch(nn.Module):
    """Reshapes to the example's batch: torch.export specialises a dynamic batch dim."""

    def __init__(self):
        super().__init__()
        self.fc, self.out = nn.Linear(6, 8), nn.Linear(8, 2)

    def forward(self, x):
        return self.out(torch.relu(self.fc(x.reshape(2, 6))))


X = torch.randn(1, 3, 6, 6)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return Net().eval()


def _plan_json(mutate: Callable[[dict], None]) -> str:
    import json
    data = json.loads(fxprune.prune(_model(), X, 0.5).plan.to_json())
    mutate(data)
    return json.dumps(data)


def _quantized() -> nn.Module:
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx
    prepared = prepare_fx(_model(), get_default_qconfig_mapping("x86"), (X,))
    prepared(X)
    return convert_fx(prepared)


def _weight_normed() -> nn.Module:
    model = _model()
    torch.nn.utils.parametrizations.weight_norm(model.conv)
    return model


def _hooked() -> nn.Module:
    model = _model()
    model.register_forward_hook(lambda module, args, out: out * 2)  # on the root: traced through
    return model


def _fixed_batch(m: nn.Module):
    spec = ({0: torch.export.Dim("rows", min=1)},)
    return fxprune.prune(FixedBatch().eval(), torch.randn(2, 6), 0.5, capture="export", dynamic_shapes=spec)


def _deploy_without(package: str, to: str):
    """Deploy with ``package`` unimportable, as when its extra is not installed."""
    import sys
    import tempfile

    import fxprune.deploy
    result = fxprune.prune(_model(), X, 0.5)
    # hide this one package only: patch.dict(sys.modules) would also drop every module first imported
    # inside it, and re-importing a protobuf extension such as onnx later aborts the process
    missing = object()
    saved = sys.modules.get(package, missing)
    sys.modules[package] = None  # type: ignore[assignment]  (None: "not installed" to the import system)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            return fxprune.deploy.deploy(result, (X,), f"{tmp}/model{fxprune.deploy.SUFFIX[to]}", to)
    finally:
        if saved is missing:
            del sys.modules[package]
        else:
            sys.modules[package] = saved


def _hf_per_layer_widths(m: nn.Module):
    """Per-layer widths asked for explicitly with the HF policy off: no config holds them."""
    transformers = pytest.importorskip("transformers")
    import fxprune.hf
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1)
    model = transformers.LlamaForCausalLM(config).eval()
    return fxprune.hf.prune(model, torch.randint(0, 50, (2, 8)), {"model.layers.0.mlp.*": 0.5},
                            hf_compatible=False)


def _apply(plan_json: str, model: nn.Module | None = None):
    return fxprune.apply_plan(model or _model(), fxprune.Plan.from_json(plan_json), X)


# (case id, call, error type, pattern the message must match)
CASES = [
    ("sparsity 1.0", lambda m: fxprune.prune(m, X, 1.0), errors.InvalidOptionError, r"sparsity.*\[0, 1\).*1\.0"),
    ("sparsity -0.1", lambda m: fxprune.prune(m, X, -0.1), errors.InvalidOptionError, r"-0\.1"),
    ("sparsity NaN", lambda m: fxprune.prune(m, X, float("nan")), errors.InvalidOptionError, r"nan"),
    ("ratio 2 in a mapping", lambda m: fxprune.prune(m, X, {"conv": 2.0}), errors.InvalidOptionError,
     r"'conv'.*2\.0"),
    ("unknown criterion", lambda m: fxprune.prune(m, X, 0.5, criterion="l3"), errors.InvalidOptionError,
     r"'l3'"),
    ("ignore pattern matching nothing", lambda m: fxprune.prune(m, X, 0.5, ignore=["blocks.*"]),
     errors.InvalidOptionError, r"'blocks\.\*' matches no"),
    ("ratio pattern matching nothing", lambda m: fxprune.prune(m, X, {"layer9*": 0.5}),
     errors.InvalidOptionError, r"'layer9\*' matches no"),
    ("round_to 0", lambda m: fxprune.prune(m, X, 0.5, round_to=0), errors.InvalidOptionError, r"round_to"),
    ("min_keep 0", lambda m: fxprune.prune(m, X, 0.5, min_keep=0), errors.InvalidOptionError, r"min_keep"),
    ("unknown capture level", lambda m: fxprune.prune(m, X, 0.5, capture="onnx"), errors.InvalidOptionError,
     r"'onnx'"),
    ("taylor without a loss", lambda m: fxprune.prune(m, X, 0.5, criterion="taylor"),
     errors.InvalidOptionError, r"loss_fn"),
    ("criterion returning the wrong shape", lambda m: fxprune.prune(m, X, 0.5, criterion=lambda g, t: [1.0]),
     errors.InvalidOptionError, r"group 'conv'"),
    ("untraceable at fx", lambda m: fxprune.prune(Branchy(), X, 0.5), errors.CaptureError,
     r"test_errors\.py:\d+ `if x\.sum\(\) > 0:`.*capture='export'"),
    ("untraceable at export", lambda m: fxprune.prune(DataDependent(), X, 0.5, capture="export"),
     errors.CaptureError, r"capture='fx'"),
    ("wrong input shape", lambda m: fxprune.prune(m, torch.randn(1, 4, 6, 6), 0.5), errors.ExampleInputError,
     r"\(1, 4, 6, 6\)"),
    ("input not a tensor", lambda m: fxprune.prune(m, "image.png", 0.5), errors.ExampleInputError, r"str"),
    ("not a model", lambda m: fxprune.prune(lambda x: x, X, 0.5), errors.UnsupportedModelError, r"function"),
    ("plan naming a missing tensor", lambda m: _apply(_plan_json(
        lambda d: d["kept_indices"].update({"fc.weight": {"0": [0]}})), m), errors.PlanMismatchError,
     r"'fc\.weight'"),
    ("plan index out of range", lambda m: _apply(_plan_json(
        lambda d: d["kept_indices"]["conv.weight"].update({"0": [0, 99]})), m), errors.PlanMismatchError,
     r"'conv\.weight'.*size 8"),
    ("plan for another width", lambda m: _apply(_plan_json(lambda d: None), Net(width=16).eval()),
     errors.PlanMismatchError, r"plan expects '[\w.]+' of shape \[8\b.*the model has \[16\b"),
    ("plan that breaks a channel tie", lambda m: _apply(_plan_json(
        lambda d: d["kept_indices"]["bn.weight"].update({"0": [0, 1, 2, 3, 4, 5, 6]})), m),
     errors.PlanMismatchError, r"channel ties"),
    ("plan that is not JSON", lambda m: fxprune.Plan.from_json("\x80\x04pickle"), errors.UnsafeFileError,
     r"not a JSON plan"),
    ("JSON that is not a plan", lambda m: fxprune.Plan.from_json('{"__reduce__": "os.system"}'),
     errors.UnsafeFileError, r"not an fxprune plan"),
    ("converted int8 graph", lambda m: fxprune.prune(_quantized(), X, 0.5), errors.UnsupportedModelError,
     r"already quantized"),
    ("BatchNorm in training mode at export", lambda m: fxprune.prune(m.train(), X, 0.5, capture="export"),
     errors.TrainingModeError, r"'bn'.*model\.eval\(\)"),
    ("parametrized layer (weight_norm) at fx", lambda m: fxprune.prune(_weight_normed(), X, 0.5),
     errors.UnsupportedModelError, r"'conv'.*parametrizations.*remove_parametrizations.*capture='export'"),
    ("forward hook fx would drop", lambda m: fxprune.prune(_hooked(), X, 0.5), errors.UnsupportedModelError,
     r"'Net' has forward hooks.*capture='export'"),
    ("bad split_axis", lambda m: fxprune.prune(m, X, 0.5, split_axis="middle"), errors.InvalidOptionError,
     r"'middle'"),
    ("data criterion without calibration", lambda m: fxprune.prune(m, X, 0.5, criterion="wanda"),
     errors.InvalidOptionError, r"'wanda'.*calibration="),
    ("empty calibration", lambda m: fxprune.prune(m, X, 0.5, criterion="wanda", calibration=[]),
     errors.CalibrationError, r"no batches"),
    ("calibration batch of another shape", lambda m: fxprune.prune(
        m, X, 0.5, criterion="activation", calibration=[X, torch.randn(1, 3, 7, 7)]), errors.CalibrationError,
     r"batch 1 input 0 has shape \(1, 3, 7, 7\)"),
    ("non-finite calibration activations", lambda m: fxprune.prune(
        m, X, 0.5, criterion="flap", calibration=[torch.full_like(X, float("inf"))]),
     errors.NonFiniteActivationError, r"batch 0 gives non-finite values at node"),
    ("recovery without calibration", lambda m: fxprune.prune(m, X, 0.5, recover=("reconstruct",)),
     errors.CalibrationError, r"recover=\['reconstruct'\] needs calibration data"),
    ("unknown recovery step", lambda m: fxprune.prune(m, X, 0.5, calibration=[X], recover=("finetune",)),
     errors.InvalidOptionError, r"unknown recovery step 'finetune'"),
    ("dynamic dim export specialises", _fixed_batch, errors.DynamicShapesError, r"rows dim"),
    ("runtime package not installed", lambda m: _deploy_without("onnxruntime", "onnx"), errors.MissingExtraError,
     r"pip install 'fxprune\[onnx\]'"),
    ("HF per-layer widths without the policy", _hf_per_layer_widths, errors.ConfigMismatchError,
     r"intermediate_size would differ between layers.*model\.layers\.0\.mlp\.gate_proj: 16.*hf_compatible=True"),
    ("negative reconstruct ridge", lambda m: fxprune.passes.Reconstruct(ridge=-1.0),
     errors.InvalidOptionError, r"ridge of 'reconstruct' must be a finite float >= 0, got -1.0"),
]


@pytest.mark.parametrize("case, call, error, pattern", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gets_a_typed_error(case, call, error, pattern):
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    training = model.training
    with pytest.raises(error) as info:
        call(model)
    assert isinstance(info.value, errors.FxPruneError)
    assert re.search(pattern, str(info.value), re.S), str(info.value)
    assert "\n" not in str(info.value).strip(), "an error is one line"
    model.train(training)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_readme_lists_every_bad_input():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    missing = [case for case, *_ in CASES if f"| {case} |" not in readme]
    assert len(CASES) >= 15 and not missing, f"README's bad-input table lacks {missing}"
