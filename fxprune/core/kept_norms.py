"""Statistics over kept positions only: what verify's reference computes in place of each normalisation.

A pruned LayerNorm normalises over the channels that are left; the original one over all of them. So the
model the pruned one must equal is the original in which every normalisation computes its statistics
over the *kept* positions only. The rules record each such site (:meth:`fxprune.core.analysis.OpCall.normalizes`)
with one of the functions below; the reference graph calls it in place of the op, with ``keep`` — 1 at
kept positions, 0 at dropped ones, shaped to broadcast against ``x`` — after ``x``.

Every function returns finite values everywhere (a fully dropped group divides by one, not zero) and
zero at the dropped positions of a normalised output, so nothing a dropped channel carries can leak.
Sums run in at least float32, as torch's own kernels do for half-precision inputs.

>>> x, keep = torch.randn(2, 4), torch.tensor([1., 0., 1., 1.])
>>> torch.allclose(kept_layer_norm(x, keep, 1)[:, [0, 2, 3]], F.layer_norm(x[:, [0, 2, 3]], (3,)), atol=1e-6)
True
"""
from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import torch
import torch.nn.functional as F

Dims = Union[int, Sequence[int], None]


def _wide(x: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    dtype = torch.promote_types(x.dtype, torch.float32)
    return x.to(dtype), keep.to(dtype)


def _dims(x: torch.Tensor, dim: Dims) -> list[int]:
    if dim is None or (not isinstance(dim, int) and len(dim) == 0):
        return list(range(x.dim()))
    return [d % x.dim() for d in ([dim] if isinstance(dim, int) else dim)]


def _count(x: torch.Tensor, keep: torch.Tensor, dims: list[int], keepdim: bool) -> torch.Tensor:
    """How many kept positions each statistic runs over (at least one)."""
    return keep.expand_as(x).sum(dims, keepdim=keepdim).clamp(min=1)


def kept_mean(x: torch.Tensor, keep: torch.Tensor, dim: Dims = None, keepdim: bool = False,
              dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``x.mean(dim, keepdim)`` over kept positions."""
    xw, kw = _wide(x, keep)
    dims = _dims(x, dim)
    out = (xw * kw).sum(dims, keepdim=keepdim) / _count(xw, kw, dims, keepdim)
    return out.to(dtype or x.dtype)


def kept_var(x: torch.Tensor, keep: torch.Tensor, dim: Dims = None, correction: float = 1,
             keepdim: bool = False) -> torch.Tensor:
    """``x.var(dim, correction=correction, keepdim=keepdim)`` over kept positions."""
    xw, kw = _wide(x, keep)
    dims = _dims(x, dim)
    mean = (xw * kw).sum(dims, keepdim=True) / _count(xw, kw, dims, True)
    squares = ((xw - mean) * kw).square().sum(dims, keepdim=keepdim)
    return (squares / (_count(xw, kw, dims, keepdim) - correction).clamp(min=1)).to(x.dtype)


def kept_std(x: torch.Tensor, keep: torch.Tensor, dim: Dims = None, correction: float = 1,
             keepdim: bool = False) -> torch.Tensor:
    """``x.std(dim, correction=correction, keepdim=keepdim)`` over kept positions."""
    return kept_var(x, keep, dim, correction, keepdim).sqrt()


def kept_var_mean(x: torch.Tensor, keep: torch.Tensor, dim: Dims = None, correction: float = 1,
                  keepdim: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    return kept_var(x, keep, dim, correction, keepdim), kept_mean(x, keep, dim, keepdim)


def kept_std_mean(x: torch.Tensor, keep: torch.Tensor, dim: Dims = None, correction: float = 1,
                  keepdim: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    return kept_std(x, keep, dim, correction, keepdim), kept_mean(x, keep, dim, keepdim)


def _affine(y: torch.Tensor, weight: Any, bias: Any) -> torch.Tensor:
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y


def _layer_norm_parts(x: torch.Tensor, keep: torch.Tensor, ndims: int, eps: float):
    xw, kw = _wide(x, keep)
    dims = list(range(x.dim() - ndims, x.dim()))
    count = _count(xw, kw, dims, True)
    mean = (xw * kw).sum(dims, keepdim=True) / count
    var = ((xw - mean) * kw).square().sum(dims, keepdim=True) / count
    return xw, kw, mean, torch.rsqrt(var + eps)


def kept_layer_norm(x: torch.Tensor, keep: torch.Tensor, ndims: int, weight: Any = None, bias: Any = None,
                    eps: float = 1e-5) -> torch.Tensor:
    """``F.layer_norm(x, x.shape[-ndims:], weight, bias, eps)`` with statistics over kept positions."""
    xw, kw, mean, rstd = _layer_norm_parts(x, keep, ndims, eps)
    return (_affine((xw - mean) * rstd, weight, bias) * kw).to(x.dtype)


def kept_native_layer_norm(x: torch.Tensor, keep: torch.Tensor, ndims: int, weight: Any = None,
                           bias: Any = None, eps: float = 1e-5) -> tuple[torch.Tensor, ...]:
    """``aten.native_layer_norm``: ``(out, mean, rstd)``."""
    _, _, mean, rstd = _layer_norm_parts(x, keep, ndims, eps)
    return kept_layer_norm(x, keep, ndims, weight, bias, eps), mean.to(x.dtype), rstd.to(x.dtype)


def kept_rms_norm(x: torch.Tensor, keep: torch.Tensor, ndims: int, weight: Any = None,
                  eps: Optional[float] = None) -> torch.Tensor:
    """``F.rms_norm(x, x.shape[-ndims:], weight, eps)`` with the mean square over kept positions."""
    xw, kw = _wide(x, keep)
    dims = list(range(x.dim() - ndims, x.dim()))
    eps = torch.finfo(x.dtype).eps if eps is None else eps
    mean_square = (xw * kw).square().sum(dims, keepdim=True) / _count(xw, kw, dims, True)
    return (_affine(xw * torch.rsqrt(mean_square + eps), weight, None) * kw).to(x.dtype)


def _group_norm_parts(x: torch.Tensor, keep: torch.Tensor, groups: int, eps: float):
    xw, kw = _wide(x, keep)
    n, c = x.shape[0], x.shape[1]
    xg = xw.reshape(n, groups, c // groups, -1)
    kg = kw.expand(1, c, *x.shape[2:]).reshape(1, groups, c // groups, -1)
    count = _count(xg, kg, [2, 3], True)
    mean = (xg * kg).sum([2, 3], keepdim=True) / count
    var = ((xg - mean) * kg).square().sum([2, 3], keepdim=True) / count
    return xg, kw, mean, torch.rsqrt(var + eps)


def kept_group_norm(x: torch.Tensor, keep: torch.Tensor, groups: int, weight: Any = None, bias: Any = None,
                    eps: float = 1e-5) -> torch.Tensor:
    """``F.group_norm(x, groups, weight, bias, eps)`` with each group's statistics over its kept channels."""
    xg, kw, mean, rstd = _group_norm_parts(x, keep, groups, eps)
    y = ((xg - mean) * rstd).reshape(x.shape)
    shape = [1, -1] + [1] * (x.dim() - 2)
    y = _affine(y, None if weight is None else weight.view(shape), None if bias is None else bias.view(shape))
    return (y * kw).to(x.dtype)


def kept_native_group_norm(x: torch.Tensor, keep: torch.Tensor, weight: Any, bias: Any, groups: int,
                           eps: float) -> tuple[torch.Tensor, ...]:
    """``aten.native_group_norm``: ``(out, mean, rstd)``, the last two of shape ``(N, groups)``."""
    _, _, mean, rstd = _group_norm_parts(x, keep, groups, eps)
    out = kept_group_norm(x, keep, groups, weight, bias, eps)
    return out, mean.flatten(1).to(x.dtype), rstd.flatten(1).to(x.dtype)


def kept_normalize(x: torch.Tensor, keep: torch.Tensor, p: float = 2.0, dim: int = 1,
                   eps: float = 1e-12) -> torch.Tensor:
    """``F.normalize(x, p, dim, eps)`` over kept positions (for ``p > 0`` a dropped zero adds nothing)."""
    return F.normalize(x * keep.to(x.dtype), p, dim, eps)


def kept_vector_norm(x: torch.Tensor, keep: torch.Tensor, ord: float = 2, dim: Dims = None,
                     keepdim: bool = False) -> torch.Tensor:
    """``torch.linalg.vector_norm`` over kept positions (``ord > 0``)."""
    return torch.linalg.vector_norm(x * keep.to(x.dtype), ord, dim, keepdim)
