"""Device check on a CUDA machine: pruned models stay on the GPU with their dtypes, verify passes
there (fp32 with TF32 off, and bf16), and pruned latency is measured against the original.

    PYTHONPATH=. python benchmarks/gpu_check.py --out gpu_check.json

Prints one JSON document; latency figures are medians of repeated timed runs, with the ratio of the
two measured side by side in the same process.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torchvision

import fxprune
from fxprune.measure import count_macs


def _devices_and_dtypes(gm: torch.nn.Module) -> tuple[set, set]:
    tensors = list(gm.parameters()) + list(gm.buffers())
    return {str(t.device) for t in tensors}, {str(t.dtype) for t in tensors if t.is_floating_point()}


def check_prune(name: str, level: str, dtype: torch.dtype) -> dict:
    torch.manual_seed(0)
    model = torchvision.models.get_model(name).eval().to("cuda", dtype)
    x = torch.randn(2, 3, 64, 64, device="cuda", dtype=dtype)
    result = fxprune.prune(model, (x,), 0.5, capture=level)
    report = fxprune.verify(model, result, (x,))
    devices, dtypes = _devices_and_dtypes(result.graph_module)
    return {"model": name, "level": level, "dtype": str(dtype), "devices": sorted(devices),
            "dtypes": sorted(dtypes), "verify_passed": report.passed, "max_abs_error": report.max_abs_error,
            "exact": report.exact}


def _median_ms(model: torch.nn.Module, x: torch.Tensor, repeats: int = 50) -> float:
    with torch.no_grad():
        for _ in range(10):
            model(x)
        times = []
        for _ in range(repeats):
            torch.cuda.synchronize()
            start = time.perf_counter()
            model(x)
            torch.cuda.synchronize()
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def latency(name: str, batch: int, round_to: int) -> dict:
    torch.manual_seed(0)
    model = torchvision.models.get_model(name).eval().cuda()
    x = torch.randn(batch, 3, 224, 224, device="cuda")
    pruned = fxprune.prune(model, (x[:1],), 0.5, round_to=round_to).graph_module
    before, after = _median_ms(model, x), _median_ms(pruned, x)
    macs_ratio = count_macs(model, (x[:1],)) / count_macs(pruned, (x[:1],))
    return {"model": name, "batch": batch, "round_to": round_to, "original_ms": before, "pruned_ms": after,
            "speedup": before / after, "macs_reduction": macs_ratio,
            "speedup_over_ideal": (before / after) / macs_ratio}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "checks": [], "latency": []}
    for level in ("fx", "export"):
        for dtype in (torch.float32, torch.bfloat16):
            out["checks"].append(check_prune("resnet18", level, dtype))
        out["checks"].append(check_prune("mobilenet_v3_small", level, torch.float32))
    for round_to in (1, 8):
        out["latency"].append(latency("resnet50", 16, round_to))
    text = json.dumps(out, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
