"""What the benchmark scripts share: isolated runs, medians, ``results.json`` and Markdown tables.

Every figure in ``benchmarks/*.md`` comes from a script in this folder and is kept in
``benchmarks/results.json`` (one section per script, merged so a partial run updates only its rows).
A measurement runs in a **fresh subprocess** (:func:`run_worker`) with a wall-clock timeout and a memory
cap, so an out-of-memory or a hang is recorded as ``"oom"`` / ``"timeout"`` and the child's
``ru_maxrss`` is its own peak. Threads are pinned (``torch.set_num_threads``) in every child: on a
shared, loaded machine an unpinned intra-op pool can run ten times slower than one thread.

``benchmarks/`` is not an installed package: scripts import this file with ``benchmarks/`` on
``sys.path``.
"""
from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results.json"


def median(values: Iterable[Optional[float]]) -> Optional[float]:
    vals = [v for v in values if isinstance(v, (int, float))]
    return statistics.median(vals) if vals else None


def limit_memory(mem_gb: float) -> None:
    """Cap heap and anonymous mmaps (``RLIMIT_DATA``): tensor storage counts, CUDA's virtual reservations don't."""
    limit = int(mem_gb * 1024**3)
    resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))


def run_worker(script: Path, args: Sequence[str], timeout_s: float, mem_gb: float,
               threads: int = 1, extra_env: Optional[dict[str, str]] = None) -> dict[str, Any]:
    """Run ``python script --worker ARGS`` in a fresh process; its last JSON line, or a status record.

    The child gets ``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` = ``threads`` (set before torch starts its
    pool), a ``timeout_s`` wall-clock limit, a ``mem_gb`` GiB ``RLIMIT_DATA`` cap, and ``extra_env``
    (``PYTHONPATH`` of another checkout, to time another commit with the same harness).
    """
    cmd = [sys.executable, str(script), "--worker", *args]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), **(extra_env or {})}
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env,
                              preexec_fn=lambda: limit_memory(mem_gb))
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "wall_s": round(time.perf_counter() - t0, 1)}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode == 0 and lines:
        return json.loads(lines[-1])
    tail = proc.stderr[-3000:]
    oom = "MemoryError" in tail or "can't allocate memory" in tail or "std::bad_alloc" in tail \
        or proc.returncode in (-9, 137)
    return {"status": "oom" if oom else "error", "returncode": proc.returncode, "stderr_tail": tail[-600:],
            "wall_s": round(time.perf_counter() - t0, 1)}


def environment(threads: int) -> dict[str, Any]:
    import torch
    env = {"python": platform.python_version(), "torch": torch.__version__, "machine": platform.machine(),
           "cpu_count": os.cpu_count(), "threads": threads, "loadavg_at_start": list(os.getloadavg()),
           "date": time.strftime("%Y-%m-%d %H:%M:%S"), "git": _git_head()}
    try:
        import torchvision
        env["torchvision"] = torchvision.__version__
    except ImportError:
        pass
    try:
        import torch_pruning
        env["torch_pruning"] = torch_pruning.__version__
    except ImportError:
        pass
    return env


def _git_head() -> str:
    """The checkout's commit (``+dirty`` when fxprune/ has uncommitted changes), or ``"?"``."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "fxprune"], cwd=HERE.parent,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "?"
    return (head or "?") + ("+dirty" if dirty else "")


def load_results() -> dict[str, Any]:
    if RESULTS.exists():
        return json.loads(RESULTS.read_text())
    return {}


def save_section(name: str, meta: dict[str, Any], rows: dict[str, Any]) -> dict[str, Any]:
    """Merge ``rows`` into ``results.json[name]`` (a row per key; newer rows replace older ones)."""
    data = load_results()
    section = data.setdefault(name, {"meta": {}, "rows": {}})
    section["meta"] = meta
    section["rows"].update(rows)
    RESULTS.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    return section


def fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def pin_threads(threads: int) -> None:
    import torch
    torch.set_num_threads(threads)


def tensor_bytes(module: Any) -> int:
    """Bytes of a module's parameters and buffers, each storage counted once."""
    seen: dict[int, int] = {}
    for t in list(module.parameters()) + list(module.buffers()):
        seen.setdefault(id(t), t.numel() * t.element_size())
    return sum(seen.values())


def random_model(name: str) -> Any:
    """torchvision model ``name`` with seeded random weights, in eval mode.

    Weights torchvision initialises to all zeros (ViT's classifier and class token) are drawn from
    N(0, 0.02) instead: a zero classifier makes every output 0 and the verify check vacuous."""
    import torch
    import torchvision
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    with torch.no_grad():
        for key, p in model.named_parameters():
            if not key.endswith("bias") and bool((p == 0).all()):
                p.normal_(0.0, 0.02)
    return model


def with_batchnorm_statistics(model: Any, shape: tuple, batches: int = 4, seed: int = 3) -> Any:
    """``model`` (in place) with BatchNorm running statistics measured on random ``shape`` batches.

    A random-weight network with torchvision's initial statistics (mean 0, var 1) does not normalise
    its activations: mobilenet_v2's logits come out near 1e-11, so any int8 rounding is all error
    (SQNR 0 dB) and says nothing about quantization. Measured statistics give every layer unit-scale
    activations, as a trained network has."""
    import torch
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for norm in norms:
            norm.reset_running_stats()
            norm.momentum = None  # a cumulative average over the batches
            norm.train()
        for _ in range(batches):
            model(torch.randn(*shape, generator=generator))
    for norm in norms:
        norm.momentum = 0.1
    return model.eval()
