"""Small, pure measurement helpers shared by the zoo tests, the CLI and the benchmarks.

* :func:`count_params` -- number of unique parameter elements of a module.
* :func:`count_macs` -- multiply-accumulates of one forward pass, counted by
  :class:`torch.utils.flop_counter.FlopCounterMode` (no third-party counter).
* :func:`peak_rss_mb` / :func:`current_rss_mb` -- the process' resident memory.
* :func:`measure` -- a context manager recording wall time and resident memory of a block.

None of these functions mutates the module it is given.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from fxprune.measure import count_params, count_macs
    >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()).eval()
    >>> count_params(model)
    224
    >>> count_macs(model, (torch.randn(1, 3, 10, 10),))  # 8 * 8*8 * 3*3*3
    13824
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import os
import resource
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

from fxprune.errors import ExampleInputError

__all__ = [
    "Measurement",
    "count_macs",
    "count_macs_by_module",
    "count_params",
    "current_rss_mb",
    "measure",
    "peak_rss_mb",
]

_MB = 1024.0 * 1024.0


def count_params(module: nn.Module) -> int:
    """Return the number of parameter elements of ``module``, each shared parameter counted once.

    Buffers (BatchNorm running statistics, masks, ...) are not parameters and are not counted.
    A parameter registered under two names (tied weights) is counted once.

    Example:
        >>> from torch import nn
        >>> count_params(nn.Linear(4, 3))  # 4*3 weights + 3 biases
        15
        >>> shared = nn.Linear(4, 4, bias=False)
        >>> count_params(nn.Sequential(shared, shared))
        16
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"count_params expects an nn.Module, got {type(module).__name__}")
    # named_parameters() deduplicates by identity by default; say so explicitly and keep it
    # independent of that default.
    seen: dict[int, nn.Parameter] = {}
    for _, p in module.named_parameters(remove_duplicate=False):
        seen.setdefault(id(p), p)
    return sum(p.numel() for p in seen.values())


def count_macs(
    module: nn.Module,
    example_inputs: tuple[Any, ...],
    example_kwargs: Mapping[str, Any] | None = None,
) -> int:
    """Return the multiply-accumulates (MACs) of one forward pass of ``module`` on ``example_inputs``.

    Counted with :class:`torch.utils.flop_counter.FlopCounterMode` under :func:`torch.no_grad`;
    ``MACs = FLOPs // 2``. FlopCounterMode counts the matrix-multiply-like ATen ops (``mm``,
    ``addmm``, ``bmm``, ``baddbmm``, convolutions, scaled-dot-product attention, its CPU kernel
    included, and ``_grouped_mm``, the stacked MoE experts of transformers 5, each token counted for
    the experts it is routed to; ``nn.MultiheadAttention`` is counted off its fused fast path); element-wise ops,
    normalisation, pooling and bias additions count zero, as in the usual MAC tables.

    **Mode.** The forward runs in the module's *current* mode, so the count is the count of the
    code path that mode takes (a few models run extra layers in training mode, e.g. GoogLeNet's
    auxiliary heads). A module in eval mode is run as is (an eval forward has no side effects on
    the module). A module in training mode would update its BatchNorm running statistics and
    ``num_batches_tracked`` even under ``no_grad``; to keep the input untouched the forward then
    runs on a :func:`copy.deepcopy` (still in training mode), at the cost of one extra copy of
    the weights in memory. Call ``module.eval()`` first to avoid that copy.

    Args:
        module: the model; never mutated.
        example_inputs: the positional arguments of one forward call, as a tuple: ``(x,)``.
        example_kwargs: optional keyword arguments of the forward call.

    Raises:
        fxprune.errors.ExampleInputError: ``example_inputs`` is not a tuple, or the forward
            raised on it (the original exception is chained).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> conv = nn.Conv2d(3, 16, kernel_size=3, padding=1).eval()
        >>> count_macs(conv, (torch.randn(2, 3, 8, 8),)) == 2 * 16 * 8 * 8 * 3 * 3 * 3
        True
        >>> count_macs(nn.Linear(4, 3).eval(), (torch.randn(5, 4),))
        60
    """
    return count_macs_by_module(module, example_inputs, example_kwargs)["Global"]  # it checks the arguments


def count_macs_by_module(
    module: nn.Module,
    example_inputs: tuple[Any, ...],
    example_kwargs: Mapping[str, Any] | None = None,
) -> dict[str, int]:
    """:func:`count_macs`, split by module: ``{"Global": total, "<class>.<path>": the MACs under that
    submodule}`` (FlopCounterMode's names: the root's class name, then the submodule's path).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> macs = count_macs_by_module(nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2)).eval(),
        ...                             (torch.randn(5, 4),))
        >>> macs["Global"], macs["Sequential.0"], macs["Sequential.1"]
        (90, 60, 30)
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"count_macs expects an nn.Module, got {type(module).__name__}")
    if not isinstance(example_inputs, tuple):
        raise ExampleInputError(
            "example_inputs must be a tuple of the forward's positional arguments, got "
            f"{type(example_inputs).__name__}; for a single tensor write (x,)"
        )
    kwargs = dict(example_kwargs or {})
    runner = copy.deepcopy(module) if module.training else module
    counter = FlopCounterMode(display=False, custom_mapping=_UNCOUNTED)
    try:
        with torch.no_grad(), _mha_fastpath_off(), counter:
            runner(*example_inputs, **kwargs)
    except Exception as exc:  # the model rejected the inputs: name the model and the inputs
        shapes = [tuple(a.shape) if isinstance(a, torch.Tensor) else type(a).__name__
                  for a in example_inputs]
        raise ExampleInputError(
            f"{type(module).__name__} raised {type(exc).__name__} on example inputs {shapes}: {exc}"
        ) from exc
    return {name: int(sum(ops.values())) // 2 for name, ops in counter.get_flop_counts().items()}


def _cpu_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


#: scaled-dot-product attention on CPU runs this kernel, which FlopCounterMode has no formula for (it
#: counts the CUDA ones): attention's two matmuls counted zero
_CPU_ATTENTION = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops}


def _grouped_mm_flops(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    if len(a_shape) == 2 and len(b_shape) == 2:  # groups along K: (M, K) x (K, N) -> (G, M, N), K split
        return 2 * a_shape[0] * a_shape[1] * b_shape[1]
    return 2 * math.prod(out_shape) * a_shape[-1]  # each output element: one dot product of length K


#: the ops FlopCounterMode has no formula for, with theirs: CPU attention, and the grouped matmul that
#: transformers 5's stacked MoE experts run (each token times the experts it is routed to: top-k, not all)
_UNCOUNTED = {**_CPU_ATTENTION, torch.ops.aten._grouped_mm: _grouped_mm_flops}


@contextlib.contextmanager
def _mha_fastpath_off():
    """``nn.MultiheadAttention`` in eval runs one fused op (``_native_multi_head_attention``) that
    FlopCounterMode does not count, projections included, but only for an even head count: an
    unpruned ViT (12 heads) counted a third fewer MACs than the same model with 9 heads would."""
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)


# --------------------------------------------------------------------------------------------
# memory and time
# --------------------------------------------------------------------------------------------

def peak_rss_mb() -> float:
    """Return this process' peak resident set size so far (``ru_maxrss``), in MiB.

    This is a **lifetime high-water mark**: it never decreases, and it includes everything the
    process did before (imports, earlier models). It is exact (kept by the kernel, no sampling)
    but only says something about a block of code if the block raised it; run a measurement in a
    fresh subprocess to get the block's own peak. ``ru_maxrss`` is in KiB on Linux and in bytes
    on macOS; both are converted. Unavailable on Windows (no :mod:`resource`).

    Example:
        >>> peak_rss_mb() > 0
        True
    """
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if sys.platform == "darwin":
        return maxrss / _MB
    return maxrss / 1024.0


def current_rss_mb() -> float | None:
    """Return this process' current resident set size in MiB, or ``None`` where unknown.

    Read from ``/proc/self/statm`` (Linux); other platforms return ``None``.

    Example:
        >>> rss = current_rss_mb()
        >>> rss is None or rss > 0
        True
    """
    try:
        with open("/proc/self/statm", "rb") as f:
            resident_pages = int(f.read().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return resident_pages * os.sysconf("SC_PAGE_SIZE") / _MB


@dataclasses.dataclass
class Measurement:
    """What :func:`measure` recorded about one block. Filled in when the block exits.

    Attributes:
        wall_s: wall-clock seconds (:func:`time.perf_counter`).
        rss_start_mb: resident memory when the block started (MiB).
        rss_peak_mb: the highest resident memory seen during the block, sampled every
            ``interval_s`` by a background thread (plus at start and end). A spike shorter than
            the interval can be missed; memory freed before the block (but still held by the
            allocator) makes the start value high. ``None`` where current RSS is unknown.
        rss_end_mb: resident memory when the block ended.
        maxrss_mb: :func:`peak_rss_mb` at the end -- the process' exact lifetime peak.
        maxrss_start_mb: :func:`peak_rss_mb` at the start.
    """

    wall_s: float = float("nan")
    rss_start_mb: float | None = None
    rss_peak_mb: float | None = None
    rss_end_mb: float | None = None
    maxrss_start_mb: float = float("nan")
    maxrss_mb: float = float("nan")

    @property
    def peak_delta_mb(self) -> float | None:
        """Sampled peak minus the start value: how much more memory the block needed at most."""
        if self.rss_peak_mb is None or self.rss_start_mb is None:
            return None
        return self.rss_peak_mb - self.rss_start_mb

    @property
    def raised_maxrss(self) -> bool:
        """Whether the block raised the process' lifetime peak (then ``maxrss_mb`` is its exact peak)."""
        return self.maxrss_mb > self.maxrss_start_mb


class _RssSampler(threading.Thread):
    def __init__(self, interval_s: float) -> None:
        super().__init__(name="fxprune-rss-sampler", daemon=True)
        self.interval_s = interval_s
        self.peak: float | None = current_rss_mb()
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.interval_s):
            rss = current_rss_mb()
            if rss is not None and (self.peak is None or rss > self.peak):
                self.peak = rss

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


@contextlib.contextmanager
def measure(interval_s: float = 0.01) -> Iterator[Measurement]:
    """Measure wall time and resident memory (RSS) of the ``with`` block.

    What it measures, honestly:

    * ``wall_s`` -- elapsed :func:`time.perf_counter` time of the block.
    * ``rss_peak_mb`` / ``peak_delta_mb`` -- the *process'* resident memory, sampled by a daemon
      thread every ``interval_s`` seconds. It sees CPU tensors, Python objects and native
      allocations alike (unlike :mod:`tracemalloc`, which sees only Python's allocator and
      misses tensor storage), but it also sees other threads, and it misses spikes shorter than
      the interval. RSS is not GPU memory: use ``torch.cuda.max_memory_allocated`` for that.
    * ``maxrss_mb`` -- the kernel's exact lifetime peak (:func:`peak_rss_mb`); it tells about
      the block only if ``raised_maxrss`` is true. For a clean per-task peak, run each task in a
      fresh subprocess and read ``maxrss_mb`` there.

    The sampler thread wakes up only every ``interval_s``; in pure-Python code it competes for
    the GIL, so its overhead is small but not zero.

    Example:
        >>> import torch
        >>> with measure() as m:
        ...     x = torch.ones(1024, 1024)  # 4 MiB
        >>> m.wall_s >= 0 and m.maxrss_mb > 0
        True
    """
    if interval_s <= 0:
        raise ValueError(f"interval_s must be > 0, got {interval_s!r}")
    m = Measurement(rss_start_mb=current_rss_mb(), maxrss_start_mb=peak_rss_mb())
    sampler = _RssSampler(interval_s) if m.rss_start_mb is not None else None
    if sampler is not None:
        sampler.start()
    t0 = time.perf_counter()
    try:
        yield m
    finally:
        m.wall_s = time.perf_counter() - t0
        m.rss_end_mb = current_rss_mb()
        if sampler is not None:
            sampler.stop()
            candidates = [v for v in (sampler.peak, m.rss_start_mb, m.rss_end_mb) if v is not None]
            m.rss_peak_mb = max(candidates) if candidates else None
        m.maxrss_mb = peak_rss_mb()
