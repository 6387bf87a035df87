"""A tiny network DSL for the fuzzer: a list of block specs becomes an ``nn.Module``.

A network is ``(in_channels, blocks)``; every block is a plain tuple (name first), so a failing
example prints as a literal that can be pasted into ``test_regressions.py``::

    build((3, [("conv", 8, 3, 1), ("bn",), ("act", "relu"), ("res", [("conv", 4, 1, 1)]), ("gap",)]))

The builder tracks the tensor's kind as blocks apply -- ``img`` ``(N, C, H, W)``, ``seq``
``(N, T, F)`` or ``vec`` ``(N, F)`` -- and ends every network with a fixed head (global pooling and a
``Linear`` to :data:`CLASSES` outputs), so the output shape is an interface the pruner must keep.
A block that does not fit the current kind is skipped (so a shrunk spec stays buildable); the
hypothesis strategy :func:`networks` only draws blocks that fit.

Blocks (``img`` unless noted):

==============================  ===================================================================
``("conv", out, k, groups)``    ``Conv2d`` (padding k//2); ``groups`` 1, 2 (grouped) or ``"dw"``
``("bn",)``                     ``BatchNorm2d`` / ``BatchNorm1d`` (vec), running stats randomised
``("act", name)``               an activation module (relu, gelu, silu, tanh, hardswish, ...)
``("fact", name)``              the same as a ``torch.nn.functional`` call
``("pool", "max" | "avg")``     2x2 pooling (skipped below 2x2)
``("res", blocks)``             ``x + body(x)``; a 1x1 conv restores the channels if the body changed them
``("se", hidden)``              squeeze-excite gating ``x * sigmoid(fc2(relu(fc1(mean(x)))))``
``("cat", blocks_a, blocks_b)`` two branches (conv/bn/act only) concatenated on channels
``("split", op)``               halves (``chunk`` or ``split`` sizes); first half through a conv; cat back
``("permute", out)``            channels-last ``Linear`` (``x.permute(0,2,3,1)``), permuted back
``("flatten",)``                ``x.flatten(1)`` -> vec
``("gap",)``                    adaptive average pool + flatten -> vec
``("toseq",)``                  ``x.flatten(2).transpose(1, 2)`` -> seq of H*W steps
``("linear", out)``             ``Linear`` on the last dim (vec or seq)
``("lstm", hidden, bidir)``     ``nn.LSTM(batch_first=True)`` (seq), output only
``("ln",)``                     ``LayerNorm`` on the last dim (vec or seq)
``("seqpool",)``                mean over time (seq) -> vec
``("shuffle", groups)``         ``nn.ChannelShuffle`` (skipped unless groups divides the channels)
``("pixel",)``                  ``PixelShuffle(2)`` then ``PixelUnshuffle(2)`` (channels a multiple of 4)
``("glu",)``                    ``nn.GLU`` over the channels (img) or features (vec, seq); even widths
``("encoder", heads)``          ``nn.TransformerEncoderLayer`` (seq; 1 head unless ``heads`` divides F)
==============================  ===================================================================
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

CLASSES = 5
BATCH = 2
SIZE = 8
ACTIVATIONS = ("relu", "gelu", "silu", "tanh", "hardswish", "leaky_relu", "sigmoid", "relu6", "elu")
_MODULE_ACTS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh, "hardswish": nn.Hardswish,
                "leaky_relu": nn.LeakyReLU, "sigmoid": nn.Sigmoid, "relu6": nn.ReLU6, "elu": nn.ELU}
Spec = tuple[int, Sequence[tuple]]


# --- blocks ----------------------------------------------------------------------------------------
class FAct(nn.Module):
    def __init__(self, name: str):
        super().__init__()
        self.name = name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(F, self.name)(x)


class Residual(nn.Module):
    def __init__(self, body: nn.Module, proj: nn.Module):
        super().__init__()
        self.body, self.proj = body, proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.proj(self.body(x))


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(channels, hidden, 1), nn.Conv2d(hidden, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean((2, 3), keepdim=True)
        return x * torch.sigmoid(self.fc2(F.relu(self.fc1(s))))


class Concat(nn.Module):
    def __init__(self, a: nn.Module, b: nn.Module):
        super().__init__()
        self.a, self.b = a, b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.a(x), self.b(x)], dim=1)


class SplitHalves(nn.Module):
    def __init__(self, channels: int, op: str):
        super().__init__()
        first = -(-channels // 2) if op == "chunk" else channels // 2  # chunk rounds the first piece up
        self.op, self.sizes = op, [first, channels - first]
        self.conv = nn.Conv2d(first, first, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = x.chunk(2, dim=1) if self.op == "chunk" else torch.split(x, self.sizes, dim=1)
        return torch.cat([F.relu(self.conv(a)), b], dim=1)


class ChannelsLast(nn.Module):
    def __init__(self, channels: int, out: int):
        super().__init__()
        self.fc = nn.Linear(channels, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class Flatten(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)


class GlobalPool(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(x, 1).flatten(1)


class ToSeq(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(2).transpose(1, 2)


class LSTMOut(nn.Module):
    def __init__(self, features: int, hidden: int, bidirectional: bool):
        super().__init__()
        self.lstm = nn.LSTM(features, hidden, batch_first=True, bidirectional=bidirectional)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x)
        return out


class SeqPool(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(1)


class Net(nn.Module):
    def __init__(self, blocks: list[nn.Module], head: nn.Module):
        super().__init__()
        self.blocks, self.head = nn.ModuleList(blocks), head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)


# --- the builder: (kind, dims) is the state a block sees ---------------------------------------------
class _State:
    def __init__(self, channels: int):
        self.kind, self.c, self.hw = "img", channels, SIZE

    @property
    def features(self) -> int:
        return self.c


def _conv(state: _State, out: int, k: int, groups: Any) -> nn.Module | None:
    if groups == "dw":
        out, g = state.c, state.c
    else:
        g = int(groups)
        if state.c % g or out % g:
            g = 1
    return nn.Conv2d(state.c, out, k, padding=k // 2, groups=g)


def _block(state: _State, spec: tuple) -> nn.Module | None:
    """One block for ``state`` (updated in place), or None when the spec does not fit the state."""
    name, args = spec[0], spec[1:]
    builder = _IMG.get(name) if state.kind == "img" else _SEQVEC.get(name)
    if builder is None:
        return None
    return builder(state, *args)


def _b_conv(state, out, k, groups):
    m = _conv(state, out, k, groups)
    state.c = m.out_channels
    return m


def _b_bn(state):
    return nn.BatchNorm2d(state.c) if state.kind == "img" else (
        nn.BatchNorm1d(state.c) if state.kind == "vec" else None)


def _b_act(state, name):
    return _MODULE_ACTS[name]()


def _b_fact(state, name):
    return FAct(name)


def _b_pool(state, kind):
    if state.hw < 2:
        return None
    state.hw //= 2
    return nn.MaxPool2d(2) if kind == "max" else nn.AvgPool2d(2)


def _b_res(state, body):
    inner = _State(state.c)
    layers = [b for b in (_branch_block(inner, s) for s in body) if b is not None]
    proj = nn.Conv2d(inner.c, state.c, 1) if inner.c != state.c else nn.Identity()
    return Residual(nn.Sequential(*layers), proj)


def _branch_block(state: _State, spec: tuple) -> nn.Module | None:
    """Blocks allowed inside res/cat branches: those that keep the spatial size and the kind."""
    if spec[0] not in ("conv", "bn", "act", "fact", "se"):
        return None
    return _block(state, spec)


def _b_se(state, hidden):
    return SqueezeExcite(state.c, hidden)


def _b_cat(state, a, b):
    sa, sb = _State(state.c), _State(state.c)
    la = [m for m in (_branch_block(sa, s) for s in a) if m is not None]
    lb = [m for m in (_branch_block(sb, s) for s in b) if m is not None]
    state.c = sa.c + sb.c
    return Concat(nn.Sequential(*la), nn.Sequential(*lb))


def _b_split(state, op):
    if state.c < 2:
        return None
    return SplitHalves(state.c, op)


def _b_permute(state, out):
    m = ChannelsLast(state.c, out)
    state.c = out
    return m


def _b_flatten(state):
    state.kind, state.c = "vec", state.c * state.hw * state.hw
    return Flatten()


def _b_gap(state):
    state.kind = "vec"
    return GlobalPool()


def _b_toseq(state):
    state.kind = "seq"
    return ToSeq()


def _b_linear(state, out):
    m = nn.Linear(state.c, out)
    state.c = out
    return m


def _b_lstm(state, hidden, bidir):
    if state.kind != "seq":
        return None
    m = LSTMOut(state.c, hidden, bool(bidir))
    state.c = hidden * (2 if bidir else 1)
    return m


def _b_ln(state):
    return nn.LayerNorm(state.c)


def _b_seqpool(state):
    if state.kind != "seq":
        return None
    state.kind = "vec"
    return SeqPool()


def _b_shuffle(state, groups):
    return nn.ChannelShuffle(groups) if state.c % groups == 0 and state.c > groups else None


def _b_pixel(state):
    return nn.Sequential(nn.PixelShuffle(2), nn.PixelUnshuffle(2)) if state.c % 4 == 0 else None


def _b_glu(state):
    if state.c % 2:
        return None
    state.c //= 2
    return nn.GLU(dim=1 if state.kind == "img" else -1)


def _b_encoder(state, heads):
    if state.kind != "seq":
        return None
    heads = heads if state.c % heads == 0 else 1
    return nn.TransformerEncoderLayer(state.c, heads, 2 * state.c, dropout=0.0, batch_first=True)


_IMG = {"conv": _b_conv, "bn": _b_bn, "act": _b_act, "fact": _b_fact, "pool": _b_pool, "res": _b_res,
        "se": _b_se, "cat": _b_cat, "split": _b_split, "permute": _b_permute, "flatten": _b_flatten,
        "gap": _b_gap, "toseq": _b_toseq, "shuffle": _b_shuffle, "pixel": _b_pixel, "glu": _b_glu}
_SEQVEC = {"bn": _b_bn, "act": _b_act, "fact": _b_fact, "linear": _b_linear, "lstm": _b_lstm, "ln": _b_ln,
           "seqpool": _b_seqpool, "glu": _b_glu, "encoder": _b_encoder}


def _head(state: _State) -> nn.Module:
    pool = {"img": GlobalPool(), "seq": SeqPool(), "vec": nn.Identity()}[state.kind]
    return nn.Sequential(pool, nn.Linear(state.c, CLASSES))


def _randomise(model: nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)


def prunable_width(spec: Spec) -> int | None:
    """The width of the first top-level plain conv whose output reaches another plain conv through
    BatchNorm and activations only (per-channel ops), or None. Those channels meet nothing but that
    conv's input contraction, so they are a prunable group by construction, whatever the rules say."""
    blocks = list(spec[1])
    for i, block in enumerate(blocks):
        if block[0] != "conv" or block[3] != 1:
            continue
        for nxt in blocks[i + 1:]:
            if nxt[0] == "conv" and nxt[3] == 1:
                return int(block[1])
            if nxt[0] not in ("bn", "act", "fact"):
                break
    return None


def build(spec: Spec, seed: int = 0) -> tuple[nn.Module, tuple[torch.Tensor]]:
    """The network of ``spec`` (seeded weights, eval mode) and one example input batch."""
    in_channels, blocks = spec
    torch.manual_seed(seed)
    state = _State(in_channels)
    layers = [m for m in (_block(state, s) for s in blocks) if m is not None]
    model = Net(layers, _head(state)).eval()
    _randomise(model, seed)
    x = torch.randn(BATCH, in_channels, SIZE, SIZE, generator=torch.Generator().manual_seed(seed + 1))
    return model, (x,)
