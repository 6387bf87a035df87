"""What pruning buys at inference: original vs pruned latency on CPU, eager and ``torch.compile``.

Per model (torchvision, random weights, eval mode): the original, the fxprune result at 50% (L1, uniform,
fx capture) and the same with ``round_to=8`` (kept channel counts a multiple of 8, which SIMD kernels
like). Each runs at batch 1 and 16 on SxS inputs (``--image``, 224 by default), eagerly and compiled
(``torch.compile``, inductor, ``dynamic=False``, one compiled object per batch size), under
``torch.no_grad`` with threads pinned (``--threads``, default 1: the machine these figures come from is
shared and loaded, and an unpinned pool thrashes there).

Timing: after warm-up calls, ``--repeat`` rounds; each round times one forward of every variant in turn
(interleaved, so load drifting during the run hits all variants alike) and the median per variant is
reported. ``speedup = original / pruned`` (same mode, same batch), ``MACs reduction = MACs original /
MACs pruned`` and ``efficiency = speedup / MACs reduction``: 1.0 means latency fell exactly as the
multiply-accumulates did (the target for resnet50 at batch 16 is >= 0.8). Each model runs in a fresh
subprocess.

    python benchmarks/bench_latency.py                       # default models, 224x224
    python benchmarks/bench_latency.py --quick               # resnet18, 64x64, 3 rounds, eager only
    python benchmarks/bench_latency.py --models resnet50 --batches 16 --no-compile
    python benchmarks/bench_latency.py --table-only
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import common  # noqa: E402

MODELS = ("resnet18", "resnet50", "mobilenet_v2", "efficientnet_b0", "regnet_y_400mf", "convnext_tiny")
SECTION = "bench_latency"
VARIANTS = ("original", "pruned", "pruned_round8")


def _variants(name: str, image: int, ratio: float) -> tuple[dict, Any, dict]:
    import torch
    import torchvision
    import fxprune
    from fxprune.measure import count_macs
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    x = torch.randn(1, 3, image, image, generator=torch.Generator().manual_seed(1))
    models = {"original": model,
              "pruned": fxprune.prune(model, (x,), sparsity=ratio).graph_module.eval(),
              "pruned_round8": fxprune.prune(model, (x,), sparsity=ratio, round_to=8).graph_module.eval()}
    macs = {k: count_macs(m, (x,)) for k, m in models.items()}
    return models, x, macs


def _time(fn: Any, x: Any) -> float:
    t0 = time.perf_counter()
    fn(x)
    return time.perf_counter() - t0


def worker(name: str, image: int, ratio: float, threads: int, batches: list[int], modes: list[str],
           repeat: int, warmup: int) -> dict[str, Any]:
    import torch
    common.pin_threads(threads)
    models, x1, macs = _variants(name, image, ratio)
    rec: dict[str, Any] = {"model": name, "image": image, "threads": threads, "macs": macs, "latency_ms": {},
                           "compile_s": {}}
    with torch.no_grad():
        for batch in batches:
            x = x1.expand(batch, -1, -1, -1).contiguous()
            for mode in modes:
                fns = {}
                for variant, m in models.items():
                    fn = torch.compile(m, dynamic=False) if mode == "compile" else m
                    t0 = time.perf_counter()
                    try:
                        for _ in range(warmup):
                            fn(x)
                    except Exception as exc:  # e.g. no C++ compiler for inductor
                        rec.setdefault("errors", {})[f"{variant}/{mode}/{batch}"] = f"{type(exc).__name__}: {exc}"[:300]
                        continue
                    if mode == "compile":
                        rec["compile_s"][f"{variant}/b{batch}"] = time.perf_counter() - t0
                    fns[variant] = fn
                times: dict[str, list[float]] = {v: [] for v in fns}
                for _ in range(repeat):
                    for variant, fn in fns.items():
                        times[variant].append(_time(fn, x))
                for variant, ts in times.items():
                    rec["latency_ms"][f"{variant}/{mode}/b{batch}"] = {"median": statistics.median(ts) * 1e3,
                                                                       "all": [round(t * 1e3, 2) for t in ts]}
    return rec


def summarize(rec: dict[str, Any]) -> dict[str, Any]:
    out = {**rec, "rows": []}
    lat = rec.get("latency_ms", {})
    for key, value in sorted(lat.items()):
        variant, mode, batch = key.split("/")
        if variant == "original":
            continue
        base = lat.get(f"original/{mode}/{batch}")
        if base is None:
            continue
        speedup = base["median"] / value["median"]
        reduction = rec["macs"]["original"] / rec["macs"][variant]
        out["rows"].append({"variant": variant, "mode": mode, "batch": int(batch[1:]), "original_ms": base["median"],
                            "pruned_ms": value["median"], "speedup": speedup, "macs_reduction": reduction,
                            "efficiency": speedup / reduction})
    return out


def markdown(section: dict[str, Any]) -> str:
    meta, rows = section["meta"], section["rows"]
    env = meta.get("env", {})
    lines = ["# bench_latency: original vs pruned latency (CPU)", "",
             f"Generated by `python benchmarks/bench_latency.py` ({meta.get('date')}, torch {env.get('torch')}, "
             f"{env.get('threads')} thread(s) of {env.get('cpu_count')} CPUs, load average at start "
             f"{env.get('loadavg_at_start', ['?'])[0]}, median of {meta.get('repeat')} interleaved rounds). "
             "50% channel sparsity, L1, uniform; `round8` = `round_to=8`. efficiency = speedup / MACs reduction "
             "(1.0 = ideal; target >= 0.8 for resnet50 at batch 16).", ""]
    body = []
    for key in sorted(rows):
        rec = rows[key]
        for r in rec.get("rows", []):
            body.append([key, r["variant"], r["mode"], r["batch"], r["original_ms"], r["pruned_ms"], r["speedup"],
                         r["macs_reduction"], r["efficiency"]])
        for what, err in rec.get("errors", {}).items():
            body.append([key, what, "error", None, None, None, None, None, err[:80].replace("|", "/")])
        if rec.get("status", "ok") != "ok":
            body.append([key, rec["status"], None, None, None, None, None, None, (rec.get("stderr_tail") or "")[:80]])
    lines.append(common.table(["model@size", "variant", "mode", "batch", "original ms", "pruned ms", "speedup",
                               "MACs reduction", "efficiency"], body))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=None)
    parser.add_argument("--image", type=int, default=224)
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--no-compile", action="store_true", help="eager only")
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=3600.0)
    parser.add_argument("--mem-gb", type=float, default=8.0)
    parser.add_argument("--quick", action="store_true", help="smoke run: resnet18, 64x64, eager, 3 rounds")
    parser.add_argument("--table-only", action="store_true")
    parser.add_argument("--worker", nargs=1, metavar="MODEL", help=argparse.SUPPRESS)
    parser.add_argument("--modes", nargs="+", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.quick:
        args.models, args.image, args.repeat, args.no_compile = args.models or ["resnet18"], 64, 3, True
    modes = args.modes or (["eager"] if args.no_compile else ["eager", "compile"])
    if args.worker:
        print(json.dumps(worker(args.worker[0], args.image, args.ratio, args.threads, args.batches, modes,
                                args.repeat, args.warmup)))
        return 0
    if args.table_only:
        section = common.load_results()[SECTION]
    else:
        rows = {}
        for name in args.models or MODELS:
            child = [name, "--image", str(args.image), "--ratio", str(args.ratio), "--threads", str(args.threads),
                     "--repeat", str(args.repeat), "--warmup", str(args.warmup), "--batches",
                     *map(str, args.batches), "--modes", *modes]
            rec = common.run_worker(Path(__file__), child, args.timeout, args.mem_gb, args.threads)
            rec.setdefault("model", name)
            rows[f"{name}@{args.image}"] = summarize(rec) if "latency_ms" in rec else rec
            print(json.dumps(rows[f"{name}@{args.image}"].get("rows", rec)), flush=True)
        meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "repeat": args.repeat, "modes": modes,
                "batches": args.batches, "env": common.environment(args.threads)}
        section = common.save_section(SECTION, meta, rows)
    (HERE / "bench_latency.md").write_text(markdown(section))
    print((HERE / "bench_latency.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
