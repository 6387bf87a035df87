"""Quantization wrappers: observers, fake-quantizers, QAT layers and fused modules — pruning during QAT.

A graph prepared for quantization (``prepare_fx``, ``prepare_qat_fx``, torchao's ``prepare_pt2e`` /
``prepare_qat_pt2e``) wraps values in **observers** (``ObserverBase``: record statistics, return their
input) and **fake-quantizers** (``FakeQuantizeBase``: round to the int grid in float). Both carry
channels straight through. Their state follows the channels where it is per channel:

- a **per-channel** observer or fake-quantizer (``per_channel_*`` qscheme, ``ch_axis``) keeps one
  ``min_val`` / ``max_val`` / ``scale`` / ``zero_point`` entry per position of ``ch_axis``: each state
  tensor of that length is tied to the channels of that dim, so rewrite slices it with them (state not
  yet sized — before the first calibration batch — is left for the observer to size);
- a **per-tensor** observer keeps scalars: nothing to slice.

Exactness: an observer never changes values. A fake-quantizer on a **weight** (its input is a
parameter, perhaps scaled by a folded BatchNorm) is exact: verify zeroes dropped weight slices, and the
observed range always includes zero, so a zeroed slice changes no scale. A fake-quantizer on an
**activation** computes its scale from statistics over all channels, dropped ones included: pruning
changes them, so the channels it sees are approximate (like LayerNorm's), except along the
``ch_axis`` of a per-channel one.

QAT layers (``torch.ao.nn.qat.Conv2d``, ``Linear``...) are their float layer plus a
``weight_fake_quant`` (per output channel) — and, for ``ConvBn*d`` / ``LinearBn1d``, a ``bn`` child on the
output channels; both are tied to the weight's rows. Fused modules of ``prepare_fx``
(``torch.ao.nn.intrinsic.ConvReLU2d`` = ``Sequential(conv, relu)``, ``ConvBnReLU2d``, ``LinearReLU``,
``BNReLU2d``...) are their first layer's rule, then BatchNorm children tied to its channels and
activations passed through. An already-converted int8 graph is refused at capture
(:func:`fxprune.core.capture.refuse_quantized`).

torchao's observer classes do not derive from torch.ao's; they are registered once torchao is imported
(importing it here would cost every user seconds): :func:`register_torchao`.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.ao.nn.intrinsic as nni
import torch.ao.nn.intrinsic.qat as nniqat
import torch.ao.nn.qat as nnqat
import torch.fx as fx
import torch.nn as nn
from torch.ao.quantization.fake_quantize import FakeQuantizeBase
from torch.ao.quantization.observer import ObserverBase

from fxprune.core.opcall import OpCall, Unsupported, weight_source
from fxprune.core.predicates import is_quantizer, torchao_quantizers  # noqa: F401  (also imported from here)
from fxprune.core.registry import OpFamily, OpRule, owner, register, register_late
from fxprune.core.rules.conv import CONV_MODULES, conv
from fxprune.core.rules.elementwise import ACTIVATION_MODULES, PASS_MODULES
from fxprune.core.rules.linear import linear

aten = torch.ops.aten

OBSERVERS: tuple[type, ...] = (ObserverBase,)
FAKE_QUANTIZERS: tuple[type, ...] = (FakeQuantizeBase,)
PER_CHANNEL = (torch.per_channel_affine, torch.per_channel_symmetric, torch.per_channel_affine_float_qparams)
STATE = ("min_val", "max_val", "scale", "zero_point")
"""The per-channel state of torch.ao's and torchao's observers and fake-quantizers."""
QAT_LAYERS = (nnqat.Conv1d, nnqat.Conv2d, nnqat.Conv3d, nnqat.Linear, nnqat.Embedding, nnqat.EmbeddingBag,
              nniqat.ConvBn1d, nniqat.ConvBn2d, nniqat.ConvBn3d, nniqat.ConvBnReLU1d, nniqat.ConvBnReLU2d,
              nniqat.ConvBnReLU3d, nniqat.LinearBn1d)
BN_STATE = ("weight", "bias", "running_mean", "running_var")


@register_late
def register_torchao() -> None:
    """Add torchao's observer and fake-quantizer bases to the rule table, if torchao is loaded."""
    global OBSERVERS, FAKE_QUANTIZERS
    for attr, cls in torchao_quantizers().items():
        if owner(cls) is not None:
            continue
        if attr == "ObserverBase":
            OBSERVERS += (cls,)
        else:
            FAKE_QUANTIZERS += (cls,)
        register(OpFamily(f"quantization (torchao {attr})", (
            OpRule((cls,), observer, rewrite=None, resize=resize_nothing),
        )))


def per_channel_axis(module: nn.Module, ndim: int) -> Optional[int]:
    """The ``ch_axis`` of a per-channel observer or fake-quantizer (None when per tensor)."""
    if getattr(module, "qscheme", None) not in PER_CHANNEL or not isinstance(getattr(module, "ch_axis", None), int):
        return None
    axis = module.ch_axis
    return axis + ndim if axis < 0 else axis


def tie_state(op: OpCall, prefix: str, module: nn.Module, ids: Optional[torch.Tensor]) -> None:
    """Tie every per-channel state tensor of ``module`` (and its children) sized like ``ids``."""
    if ids is None:
        return
    tensors = list(module.named_buffers()) + list(module.named_parameters())
    for name, tensor in tensors:
        if name.rpartition(".")[2] in STATE and tensor.dim() == 1 and tensor.numel() == ids.numel():
            op.unify(ids, op.param(f"{prefix}.{name}")[0])


# --- observers and fake-quantizers --------------------------------------------------------------
def observer(op: OpCall) -> Any:
    # observe(x) / fake_quant(x) -> x; per-channel state follows ch_axis
    x = op.arg(0, "x", op.node.kwargs.get("X"))
    x_ids = op.ids(x)
    if not isinstance(x_ids, tuple):
        return op.fixed()
    axis = per_channel_axis(op.module, len(x_ids))
    if axis is not None and axis < len(x_ids):
        tie_state(op, str(op.node.target), op.module, x_ids[axis])
    if isinstance(op.module, FAKE_QUANTIZERS) and not _is_weight(op, x):
        for dim, ids in enumerate(x_ids):
            if dim != axis:
                op.approximate(ids)  # the scale mixes every channel of this dim
    return x_ids


def _is_weight(op: OpCall, x: Any) -> bool:
    source = weight_source(x, op.ctx.gm)
    return isinstance(source, fx.Node) and source.op == "get_attr"


# --- QAT layers -------------------------------------------------------------------------------
def qat_layer(op: OpCall) -> Any:
    # qat conv/linear(x) -> the float layer; weight_fake_quant and a fused bn follow the weight's rows
    out = float_rule(op.module)(op)
    target, module = str(op.node.target), op.module
    weight = op.param(f"{target}.weight")
    fq = getattr(module, "weight_fake_quant", None)
    axis = per_channel_axis(fq, len(weight)) if fq is not None else None
    if axis is not None:
        tie_state(op, f"{target}.weight_fake_quant", fq, weight[axis])
    bn = getattr(module, "bn", None)
    if isinstance(bn, nn.modules.batchnorm._BatchNorm):
        for name in BN_STATE:
            if getattr(bn, name, None) is not None:
                op.unify(weight[0], op.param(f"{target}.bn.{name}")[0])
    return out


def float_rule(module: nn.Module) -> Any:
    """The rule of the float layer a QAT layer extends (``nn.Conv2d`` for ``nnqat.Conv2d``)."""
    for cls in type(module).__mro__:
        found = owner(cls)
        if found is not None and found.analyze not in (qat_layer, fused_module):
            return found.analyze
    raise Unsupported(f"no float layer rule for {type(module).__name__}")


# --- fused modules (prepare_fx) ----------------------------------------------------------------
def fused_module(op: OpCall) -> Any:
    # Sequential(layer, bn?, activation?) -> the layer's rule, bn tied to its channels, activations pass
    module, target = op.module, str(op.node.target)
    if type(module).forward is not nn.Sequential.forward:
        raise Unsupported(f"fused module {type(module).__name__} with its own forward")
    ids = _fused_first(OpCall(op.ctx, op.node, module[0]), f"{target}.0")
    for index, child in list(enumerate(module))[1:]:
        _fused_child(op, f"{target}.{index}", child, ids)
    return ids


def _fused_first(op: OpCall, prefix: str) -> Any:
    """The first layer of a fused module, its parameters keyed under ``prefix``."""
    first, x = op.module, op.arg(0, "input")
    bias = f"{prefix}.bias" if getattr(first, "bias", None) is not None else None
    if isinstance(first, CONV_MODULES):
        return conv(op, x, f"{prefix}.weight", bias, first.groups, False)
    if isinstance(first, nn.Linear):
        return linear(op, x, f"{prefix}.weight", bias)
    if isinstance(first, nn.modules.batchnorm._BatchNorm):
        ids = op.ids(x)
        _fused_child(op, prefix, first, ids)
        return ids
    raise Unsupported(f"fused module starting with {type(first).__name__}")


def _fused_child(op: OpCall, prefix: str, child: nn.Module, ids: Any) -> None:
    if isinstance(child, ACTIVATION_MODULES + PASS_MODULES):
        return
    if not isinstance(child, nn.modules.batchnorm._BatchNorm):
        raise Unsupported(f"fused {type(child).__name__} after the first layer")
    c = 1 if len(ids) > 1 else 0
    for name in BN_STATE:
        if getattr(child, name, None) is not None:
            op.unify(ids[c], op.param(f"{prefix}.{name}")[0])


# --- resizers ---------------------------------------------------------------------------------
def resize_nothing(old: nn.Module, new: nn.Module, rw: Any) -> None:
    """Observers hold no size attribute: their state tensors were sliced."""


def _fix_batch_norms(new: nn.Module) -> None:
    """Children were resized with the parent's input shape; a BatchNorm's size is its own state's."""
    for child in new.modules():
        if isinstance(child, nn.modules.batchnorm._BatchNorm) and child.running_mean is not None:
            child.num_features = child.running_mean.numel()
        elif isinstance(child, nn.modules.batchnorm._BatchNorm) and child.weight is not None:
            child.num_features = child.weight.numel()


def resize_qat_with_bn(old: nn.Module, new: nn.Module, rw: Any) -> None:
    float_resizer(old)(old, new, rw)
    _fix_batch_norms(new)


def resize_fused(old: nn.Module, new: nn.Module, rw: Any) -> None:
    _fix_batch_norms(new)


def float_resizer(module: nn.Module) -> Any:
    for cls in type(module).__mro__[1:]:
        found = owner(cls)
        if found is not None and found.resize not in (None, resize_qat_with_bn, resize_fused):
            return found.resize
    raise AssertionError(f"no float layer resizer for {type(module).__name__}")


WITH_BN = (nniqat.ConvBn1d, nniqat.ConvBn2d, nniqat.ConvBn3d, nniqat.LinearBn1d)
FAMILY = register(OpFamily("quantization", (
    # observe(x) / fake_quant(x) -> x: channels pass; per-channel state follows ch_axis
    OpRule(OBSERVERS + FAKE_QUANTIZERS, observer, rewrite=None, resize=resize_nothing),
    # qat layer(x) -> its float layer; a fused bn follows the weight's rows
    OpRule(WITH_BN, qat_layer, rewrite=None, resize=resize_qat_with_bn),
    OpRule(tuple(c for c in QAT_LAYERS if c not in WITH_BN), qat_layer, rewrite=None),
    # Sequential(layer, bn?, activation?) -> the layer's rule
    OpRule((nni._FusedModule,), fused_module, rewrite=None, resize=resize_fused),
)))
register_torchao()
