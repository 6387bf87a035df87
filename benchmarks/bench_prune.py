"""Pruning cost, side by side: fxprune (fx and export capture) vs Torch-Pruning vs torch.ao.

Each tool prunes each torchvision model (random weights, eval mode, seeded) at 50% channel sparsity,
L1 magnitude, uniform ratio, classifier kept, on a 1x3xSxS input (S = ``--image``, 224 by default):

* ``fxprune-fx`` / ``fxprune-export``: ``fxprune.prune(model, (x,), sparsity, capture=...)``;
* ``torch-pruning``: ``BasePruner`` + ``GroupMagnitudeImportance(p=1)``, ``ignored_layers=[classifier]``
  (:func:`peers.prune_with_torch_pruning`, in place on its own model, no output check in the timing);
* ``torch-ao``: ``SaliencyPruner`` ``prepare/step/prune`` (:func:`peers.prune_with_torch_ao`), which
  refuses every model here (BN and residuals are outside its patterns): recorded as ``unsupported``.

Every (tool, model) pair runs in a **fresh subprocess** (timeout + memory cap, threads pinned) that
measures the first call (``cold``: what a user running it once sees; imports excluded and reported
apart) and a second call on a freshly built model in the same process (``warm``). Model construction is
never timed. Per call: wall time, peak RSS during the call (sampled, plus ``ru_maxrss`` when the call
raised it), and after the cold call: parameters and MACs of the result and fxprune's verify error
(max abs difference to the zeroed-channel reference). Runs are interleaved (run 1 of every tool on a
model, then run 2, ...), and the fxprune/Torch-Pruning ratio is taken per run and its median reported.

Memory ratio = (peak RSS during the call - RSS after imports, before the model was built) / (original
weights + pruned weights): the target is at most 1.25.

    python benchmarks/bench_prune.py                        # every model, 3 runs, 224x224 (hours)
    python benchmarks/bench_prune.py --quick                # resnet18 + mobilenet_v2, 1 run, 64x64
    python benchmarks/bench_prune.py --models resnet50 swin_t --runs 5
    python benchmarks/bench_prune.py --table-only           # rebuild bench_prune.md from results.json
"""
from __future__ import annotations

import argparse
import os
import gc
import json
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import common  # noqa: E402

MODELS = ("resnet18", "resnet50", "resnet152", "mobilenet_v2", "densenet121", "efficientnet_b0",
          "convnext_tiny", "regnet_y_400mf", "vit_b_16", "swin_t")
QUICK_MODELS = ("resnet18", "mobilenet_v2")
TOOLS = ("fxprune-fx", "fxprune-export", "torch-pruning", "torch-ao")
FXPRUNE = ("fxprune-fx", "fxprune-export")
SECTION = "bench_prune"
MB = 1024.0 * 1024.0


# --- the worker: one tool, one model, in this (fresh) process -------------------------------------------
def build(name: str, image: int):
    import torch
    model = common.random_model(name)
    x = torch.randn(1, 3, image, image, generator=torch.Generator().manual_seed(1))
    return model, x


def prune_once(tool: str, model: Any, x: Any, ratio: float) -> Any:
    if tool in FXPRUNE:
        import fxprune
        # BENCH_PRUNE_STATIC=1: the example's shapes only (dynamic_shapes=None), so bench_prune_before_after
        # can tell the cost of the dynamic batch dim (the export default since issue 9) from the rest
        static = {"dynamic_shapes": None} if os.environ.get("BENCH_PRUNE_STATIC") else {}
        return fxprune.prune(model, (x,), sparsity=ratio, criterion="l1", capture=tool.split("-")[1], **static)
    import peers
    if tool == "torch-pruning":
        return peers.prune_with_torch_pruning(model, (x,), ratio, inplace=True, check=False)
    return peers.prune_with_torch_ao(model, (x,), ratio)


def _peak(m: Any) -> float:
    peak = m.rss_peak_mb or 0.0
    return max(peak, m.maxrss_mb) if m.raised_maxrss else peak


def timed_call(tool: str, name: str, image: int, ratio: float) -> tuple[Any, Any, Any, dict]:
    from fxprune.measure import measure
    model, x = build(name, image)
    gc.collect()
    with measure(interval_s=0.005) as m:
        out = prune_once(tool, model, x, ratio)
    return model, x, out, {"s": m.wall_s, "peak_rss_mb": _peak(m)}


def worker(tool: str, name: str, image: int, ratio: float, threads: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    import torch  # noqa: F401
    import torchvision  # noqa: F401
    import fxprune
    import peers
    from fxprune.measure import count_macs, count_params, current_rss_mb
    if tool == "torch-pruning":
        import torch_pruning  # noqa: F401
    import_s = time.perf_counter() - t0
    common.pin_threads(threads)
    base_rss = current_rss_mb()
    rec: dict[str, Any] = {"tool": tool, "model": name, "image": image, "ratio": ratio, "import_s": import_s}
    try:
        model, x, out, cold = timed_call(tool, name, image, ratio)
    except peers.PeerUnsupported as exc:
        return {**rec, "status": "unsupported", "reason": exc.reason[:300]}
    except peers.PeerBrokenResult as exc:
        return {**rec, "status": "broken", "reason": exc.reason[:300]}
    except MemoryError as exc:
        return {**rec, "status": "oom", "reason": str(exc)[:300]}
    pruned = out.graph_module if tool in FXPRUNE else out
    original, _ = build(name, image)
    orig_bytes, pruned_bytes = common.tensor_bytes(original), common.tensor_bytes(pruned)
    rec.update(status="ok", cold_s=cold["s"], cold_peak_rss_mb=cold["peak_rss_mb"], base_rss_mb=base_rss,
               weights_mb=orig_bytes / MB, pruned_weights_mb=pruned_bytes / MB,
               params_before=count_params(original), params_after=count_params(pruned),
               macs_before=count_macs(original, (x,)), macs_after=count_macs(pruned.eval(), (x,)))
    rec["mem_ratio"] = (cold["peak_rss_mb"] - base_rss) / ((orig_bytes + pruned_bytes) / MB)
    if tool in FXPRUNE:
        report = fxprune.verify(model, out, (x,))
        rec.update(verify_max_abs=report.max_abs_error, verify_passed=report.passed, verify_exact=report.exact)
    del model, out, pruned, original
    gc.collect()
    _, _, _, warm = timed_call(tool, name, image, ratio)
    rec.update(warm_s=warm["s"], warm_peak_rss_mb=warm["peak_rss_mb"])
    return rec


# --- the driver -----------------------------------------------------------------------------------
def run(models: list[str], tools: list[str], runs: int, image: int, ratio: float, threads: int,
        timeout_s: float, mem_gb: float) -> dict[str, Any]:
    records: dict[str, dict[str, list]] = {m: {t: [] for t in tools} for m in models}
    for r in range(runs):
        for name in models:
            for tool in tools:
                last = records[name][tool][-1] if records[name][tool] else None
                if last is not None and last["status"] in ("unsupported", "broken", "oom", "timeout"):
                    continue  # the same refusal again would only cost time
                rec = common.run_worker(Path(__file__), [tool, name, "--image", str(image), "--ratio", str(ratio),
                                                         "--threads", str(threads)], timeout_s, mem_gb, threads)
                rec.setdefault("tool", tool)
                rec.setdefault("model", name)
                rec["run"] = r
                records[name][tool].append(rec)
                print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in rec.items()
                                  if k != "stderr_tail"}), flush=True)
    return {f"{name}@{image}": summarize(name, image, records[name]) for name in models}


def summarize(name: str, image: int, by_tool: dict[str, list]) -> dict[str, Any]:
    out: dict[str, Any] = {"model": name, "image": image, "tools": {}}
    for tool, recs in by_tool.items():
        ok = [r for r in recs if r.get("status") == "ok"]
        if not ok:
            first = recs[0] if recs else {"status": "not run"}
            out["tools"][tool] = {"status": first["status"], "reason": first.get("reason") or first.get("stderr_tail"),
                                  "runs": len(recs)}
            continue
        summary = {"status": "ok", "runs": len(ok)}
        for key in ("cold_s", "warm_s", "cold_peak_rss_mb", "mem_ratio", "import_s", "verify_max_abs"):
            summary[key] = common.median(r.get(key) for r in ok)
        for key in ("params_before", "params_after", "macs_before", "macs_after", "weights_mb", "pruned_weights_mb",
                    "verify_passed", "verify_exact"):
            summary[key] = ok[-1].get(key)
        summary["cold_all"] = [round(r["cold_s"], 3) for r in ok]
        summary["warm_all"] = [round(r["warm_s"], 3) for r in ok]
        out["tools"][tool] = summary
    tp = by_tool.get("torch-pruning", [])
    for tool in FXPRUNE:
        for phase in ("cold", "warm"):
            ratios = [a[f"{phase}_s"] / b[f"{phase}_s"] for a, b in zip(by_tool.get(tool, []), tp)
                      if a.get("status") == b.get("status") == "ok"]
            out[f"{tool}/tp_{phase}"] = common.median(ratios)
    return out


# --- the table --------------------------------------------------------------------------------------
def markdown(section: dict[str, Any]) -> str:
    meta, rows = section["meta"], section["rows"]
    lines = ["# bench_prune: pruning cost, fxprune vs Torch-Pruning vs torch.ao", "",
             f"Generated by `python benchmarks/bench_prune.py` ({_meta_line(meta)}). 50% channel sparsity, L1, "
             "uniform, classifier kept. Times are medians over runs, each (tool, model) in a fresh subprocess; "
             "`cold` = first call in the process, `warm` = second call (fresh model, same process). "
             "`mem ratio` = (peak RSS during the cold call - RSS before the model was built) / (original + "
             "pruned weights); target <= 1.25. Ratios are fxprune/Torch-Pruning, per run, median; target <= 0.5.",
             "", "## Time ratio to Torch-Pruning", ""]
    ratio_rows = []
    for key in sorted(rows, key=_order):
        row = rows[key]
        ratio_rows.append([key, row.get("fxprune-fx/tp_cold"), row.get("fxprune-fx/tp_warm"),
                           row.get("fxprune-export/tp_cold"), row.get("fxprune-export/tp_warm"),
                           _target(row)])
    lines.append(common.table(["model@size", "fx/TP cold", "fx/TP warm", "export/TP cold", "export/TP warm",
                               "<= 0.5 (fx cold)"], ratio_rows))
    lines += ["", "## Every tool", ""]
    body = []
    for key in sorted(rows, key=_order):
        for tool, t in rows[key]["tools"].items():
            if t["status"] != "ok":
                body.append([key, tool, t["status"], None, None, None, None, None, None, None,
                             (t.get("reason") or "")[:90].replace("|", "/").replace("\n", " ")])
                continue
            body.append([key, tool, "ok", t["cold_s"], t["warm_s"], t["cold_peak_rss_mb"], t["mem_ratio"],
                         f"{t['params_before'] / 1e6:.2f} -> {t['params_after'] / 1e6:.2f}",
                         f"{t['macs_before'] / 1e9:.2f} -> {t['macs_after'] / 1e9:.2f}",
                         f"{t['verify_max_abs']:.1e}" if t.get("verify_max_abs") is not None else None,
                         f"runs {t['runs']}, import {t['import_s']:.1f}s"])
    lines.append(common.table(["model@size", "tool", "status", "cold s", "warm s", "peak RSS MB", "mem ratio",
                               "params M", "GMACs", "verify err", "notes"], body))
    return "\n".join(lines) + "\n"


def _order(key: str) -> tuple:
    name = key.split("@")[0]
    return (MODELS.index(name) if name in MODELS else len(MODELS), key)


def _target(row: dict) -> str:
    r = row.get("fxprune-fx/tp_cold")
    if r is None:
        return "n/a"
    return "met" if r <= 0.5 else "missed"


def _meta_line(meta: dict) -> str:
    env = meta.get("env", {})
    return (f"{meta.get('date', '?')}, commit {env.get('git', '?')}, torch {env.get('torch', '?')}, Torch-Pruning {env.get('torch_pruning', '?')}, "
            f"{env.get('threads', '?')} thread(s) of {env.get('cpu_count', '?')} CPUs, load average at start "
            f"{env.get('loadavg_at_start', ['?'])[0]}, {meta.get('runs', '?')} run(s)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=None)
    parser.add_argument("--tools", nargs="+", default=list(TOOLS), choices=TOOLS)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--image", type=int, default=224, help="input size (default 224, the issue's standard)")
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads in every child (default 1)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per child process")
    parser.add_argument("--mem-gb", type=float, default=8.0, help="memory cap per child (RLIMIT_DATA)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 small models, 64x64, 1 run")
    parser.add_argument("--table-only", action="store_true")
    parser.add_argument("--worker", nargs=2, metavar=("TOOL", "MODEL"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        print(json.dumps(worker(args.worker[0], args.worker[1], args.image, args.ratio, args.threads)))
        return 0
    if args.table_only:
        section = common.load_results()[SECTION]
    else:
        models = args.models or list(QUICK_MODELS if args.quick else MODELS)
        image, runs = (64, 1) if args.quick else (args.image, args.runs)
        rows = run(models, args.tools, runs, image, args.ratio, args.threads, args.timeout, args.mem_gb)
        meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "runs": runs, "env": common.environment(args.threads)}
        section = common.save_section(SECTION, meta, rows)
    (HERE / "bench_prune.md").write_text(markdown(section))
    print((HERE / "bench_prune.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
