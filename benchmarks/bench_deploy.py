"""What pruning buys where the model runs: latency in eager PyTorch, Inductor, ExecuTorch (XNNPACK) and
ONNX Runtime, file sizes, and whether the artefacts still compute the pruned model.

Per model (torchvision with random weights and BatchNorm statistics measured on random batches, so
activations keep their scale and int8's SQNR means something; or a small LLaMA of issue 6's
configuration with random weights — latency does not depend on the weights), variants: the original, fxprune at 30% and 50%
(L1, uniform), each also with ``round_to`` 8 and 16; and, for the two deploy runtimes, the original, 30% and
50% (with ``round_to`` 1 and 16) quantized to int8 (PT2E: ExecuTorch's XNNPACKQuantizer for the ``.pte``, torchao's
X86InductorQuantizer for the ``.onnx``, calibrated on 4 random batches of 4). Each artefact is written by
:mod:`fxprune.deploy` with a dynamic batch (1..16) and checked there, in its runtime, against the
fp32 pruned graph (fp32: max error relative to the output scale; int8: SQNR).

Timing: threads pinned (``--threads``, default 1: the machine is shared), batch 16 then 1, one warm-up
call, then ``--repeat`` rounds (``--repeat-heavy`` for vit_b_16 at batch 16), each timing one call of
every variant in turn (interleaved, so load drifting during the run hits all alike); the median is
kept. ``speedup`` = original / pruned (same runtime, precision and batch), ``MACs reduction`` = MACs
original / MACs pruned, ``efficiency`` = speedup / MACs reduction (1.0: latency fell as much as the
multiply-accumulates). Each model runs in a fresh subprocess, and every measurement is written to
``bench_deploy.json`` as soon as it is taken, so a cut run still yields its table (``--table-only``).

    python benchmarks/bench_deploy.py                            # the sweep: resnet50 mobilenet_v2 llama vit_b_16
    python benchmarks/bench_deploy.py --models mobilenet_v2 --runtimes executorch onnx
    python benchmarks/bench_deploy.py --quick                    # resnet18 at 64x64, 2 rounds: a smoke run
    python benchmarks/bench_deploy.py --table-only               # rebuild the .md and .png from the .json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import common  # noqa: E402

MODELS = ("resnet50", "mobilenet_v2", "llama", "vit_b_16")
RUNTIMES = ("eager", "inductor", "executorch", "onnx")
DEPLOY = ("executorch", "onnx")
FP32 = {"original": (0.0, 1), "p30": (0.3, 1), "p30_r8": (0.3, 8), "p30_r16": (0.3, 16), "p50": (0.5, 1),
        "p50_r8": (0.5, 8), "p50_r16": (0.5, 16)}
INT8 = ("original+int8", "p30+int8", "p30_r16+int8", "p50+int8", "p50_r16+int8")
JSON, MD, PNG = HERE / "bench_deploy.json", HERE / "bench_deploy.md", HERE / "bench_deploy.png"
ARTEFACTS = HERE / ".cache" / "bench_deploy"
MAX_BATCH = 16


# --- results: every measurement is written as soon as it is taken, one file per model (workers run in
# parallel), merged into bench_deploy.json ------------------------------------------------------------------
def load() -> dict[str, Any]:
    """bench_deploy.json with every model's partial file merged in."""
    data = json.loads(JSON.read_text()) if JSON.exists() else {"meta": {}, "models": {}}
    for part in sorted(ARTEFACTS.glob("*.json")) if ARTEFACTS.exists() else ():
        data["models"][part.stem] = json.loads(part.read_text())
    return data


def _write(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def record(model: str, section: str, key: str, value: Any) -> None:
    ARTEFACTS.mkdir(parents=True, exist_ok=True)
    part = ARTEFACTS / f"{model}.json"
    data = json.loads(part.read_text()) if part.exists() else {}
    data.setdefault(section, {})[key] = value
    _write(part, data)


# --- the models ---------------------------------------------------------------------------------------------
def _llama():
    import torch
    from quality_models import LLAMA, llama_model
    torch.manual_seed(0)
    model = llama_model().eval()
    ids = torch.randint(0, 256, (1, LLAMA["seq"]), generator=torch.Generator().manual_seed(1))
    # the original in the form the pruned variants take (an export-level graph), so eager compares alike
    batch = ({0: torch.export.Dim("batch", min=1, max=64)},)  # traced at batch 2: export specialises a 1
    return torch.export.export(model, (ids.repeat(2, 1),), dynamic_shapes=batch).module(), ids, "export"


def _vision(name: str, image: int):
    import torch
    model = common.with_batchnorm_statistics(common.random_model(name), (8, 3, image, image))
    x = torch.randn(1, 3, image, image, generator=torch.Generator().manual_seed(1))
    return model, x, "fx"


def build_variants(name: str, image: int) -> tuple[dict[str, Any], Any, dict[str, int]]:
    """{variant: fp32 module}, the batch-1 example input, {variant: MACs}."""
    import fxprune
    from fxprune.measure import count_macs
    model, x, level = _llama() if name == "llama" else _vision(name, image)
    variants = {"original": model}
    for variant, (ratio, round_to) in FP32.items():
        if ratio:
            variants[variant] = fxprune.prune(model, (x,), sparsity=ratio, round_to=round_to, capture=level,
                                              progress=False).graph_module
    return variants, x, {v: int(count_macs(m, (x,))) for v, m in variants.items()}


def batch_of(x: Any, batch: int) -> Any:
    return x.expand(batch, *x.shape[1:]).contiguous()


# --- runtimes: {variant: callable(x)} ---------------------------------------------------------------------------
def eager(variants: dict[str, Any], x: Any, name: str, threads: int) -> dict[str, Callable]:
    return {v: m for v, m in variants.items() if v in variants.get("_only", FP32)}


def inductor(variants: dict[str, Any], x: Any, name: str, threads: int) -> dict[str, Callable]:
    import torch
    return {v: torch.compile(m, dynamic=False)  # compiled at warm-up, once per batch size
            for v, m in variants.items() if v in variants.get("_only", FP32)}


def deployed(runtime: str, variants: dict[str, Any], x: Any, name: str, threads: int) -> dict[str, Callable]:
    """Write every fp32 and int8 artefact for ``runtime`` (``variants`` may hold only some), record size
    and agreement, load it."""
    import torch
    from fxprune import deploy
    ARTEFACTS.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(2)
    calibration = [_random_like(x, 4, generator) for _ in range(4)]
    runs = {}
    for variant in [*FP32, *INT8]:
        base, _, quant = variant.partition("+")
        if variant not in variants.get("_only", [*FP32, *INT8]):
            continue
        path = ARTEFACTS / f"{name}_{variant}{deploy.SUFFIX[runtime]}"
        t0 = time.perf_counter()
        try:
            art = deploy.deploy(variants[base], (x,), path, runtime, quantize=quant or None,
                                calibration=calibration if quant else None, max_batch=MAX_BATCH)
        except Exception as exc:  # recorded, the sweep goes on
            record(name, "errors", f"{variant}/{runtime}", f"{type(exc).__name__}: {exc}"[:400])
            continue
        record(name, "artefacts", f"{variant}/{runtime}", {
            "size_bytes": art.size_bytes, "batch": list(art.batch), "build_s": round(time.perf_counter() - t0, 1),
            "max_abs_error": art.agreement.max_abs_error, "relative_error": art.agreement.relative_error,
            "sqnr_db": art.agreement.sqnr_db, "not_delegated": len(art.not_delegated), "notes": list(art.notes)})
        runs[variant] = deploy.load(path, runtime, threads=threads)
    return runs


def _random_like(x: Any, batch: int, generator: Any) -> Any:
    import torch
    if x.dtype.is_floating_point:
        return torch.randn(batch, *x.shape[1:], generator=generator)
    return torch.randint(0, 256, (batch, *x.shape[1:]), generator=generator)


RUNTIME_BUILDERS = {"eager": eager, "inductor": inductor,
                    "executorch": lambda *a: deployed("executorch", *a), "onnx": lambda *a: deployed("onnx", *a)}


# --- timing -----------------------------------------------------------------------------------------------------
def time_runtime(name: str, runtime: str, runs: dict[str, Callable], x: Any, batches: list[int], repeat: int,
                 repeat_heavy: int) -> None:
    import torch
    for batch in batches:
        xb = batch_of(x, batch)
        rounds = repeat_heavy if name == "vit_b_16" and batch > 1 else repeat
        live = {}
        with torch.no_grad():
            for variant, fn in runs.items():
                try:
                    fn(xb)  # warm-up (Inductor compiles here)
                    live[variant] = fn
                except Exception as exc:
                    record(name, "errors", f"{variant}/{runtime}/b{batch}", f"{type(exc).__name__}: {exc}"[:400])
            times: dict[str, list[float]] = {v: [] for v in live}
            for _ in range(rounds):
                for variant, fn in live.items():
                    t0 = time.perf_counter()
                    fn(xb)
                    times[variant].append((time.perf_counter() - t0) * 1e3)
        for variant, ts in times.items():
            record(name, "latency_ms", f"{variant}/{runtime}/b{batch}",
                   {"median": statistics.median(ts), "all": [round(t, 2) for t in ts]})


def worker(name: str, image: int, threads: int, runtimes: list[str], batches: list[int], repeat: int,
           repeat_heavy: int, only: dict[str, list[str]]) -> dict[str, Any]:
    common.pin_threads(threads)
    t0 = time.perf_counter()
    variants, x, macs = build_variants(name, image)
    record(name, "macs", "all", macs)
    record(name, "meta", "input", list(x.shape))
    record(name, "meta", "only", {rt: only.get(rt, "all") for rt in runtimes})
    for runtime in runtimes:
        chosen = {**variants, "_only": only[runtime]} if runtime in only else variants
        runs = RUNTIME_BUILDERS[runtime](chosen, x, name, threads)
        time_runtime(name, runtime, runs, x, batches, repeat, repeat_heavy)
        record(name, "meta", f"done/{runtime}", round(time.perf_counter() - t0, 1))
    return {"status": "ok", "wall_s": round(time.perf_counter() - t0, 1)}


# --- the table and the plot -------------------------------------------------------------------------------------
def rows(data: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (model, variant, runtime, batch) with a measured original beside it."""
    out = []
    for name, rec in data["models"].items():
        lat, macs = rec.get("latency_ms", {}), rec.get("macs", {}).get("all", {})
        for key, value in sorted(lat.items()):
            variant, runtime, batch = key.split("/")
            base, _, quant = variant.partition("+")
            if base == "original":
                continue
            ref = lat.get(f"original{'+' + quant if quant else ''}/{runtime}/{batch}")
            if ref is None or base not in macs:
                continue
            speedup = ref["median"] / value["median"]
            reduction = macs["original"] / macs[base]
            out.append({"model": name, "variant": variant, "runtime": runtime, "batch": int(batch[1:]),
                        "original_ms": ref["median"], "pruned_ms": value["median"], "speedup": speedup,
                        "macs_reduction": reduction, "efficiency": speedup / reduction})
    return out


def markdown(data: dict[str, Any]) -> str:
    meta = data.get("meta", {})
    env = meta.get("env", {})
    table = rows(data)
    lines = ["# bench_deploy: pruned models where they run (CPU)", "",
             f"Generated by `python benchmarks/bench_deploy.py` ({env.get('date')}, torch {env.get('torch')}, "
             f"git {env.get('git')}; {env.get('threads')} thread(s) of {env.get('cpu_count')} CPUs; load average "
             f"{_load(meta)}; every ratio compares variants timed interleaved in one run, so load drifting "
             f"during the run hits them alike). Median of {meta.get('repeat')} rounds ({meta.get('repeat_heavy')} for "
             f"vit_b_16 at batch 16) after one warm-up call. Inductor and eager are fp32 only (int8 is a deploy "
             f"format here).", "", *([meta["note"], ""] if meta.get("note") else []),
             "## Speedup / MACs reduction at batch 16 (target ≥ 0.8 for the CNNs in every runtime)", ""]
    lines += _efficiency_table(table, 16)
    lines += ["", "## Speedup / MACs reduction at batch 1", ""]
    lines += _efficiency_table(table, 1)
    lines += ["", "## What round_to buys (fp32): latency relative to round_to=1 at the same sparsity, batch 16 / "
              "batch 1", "",
              *_round_to_table(data), "", "## File sizes and agreement with the pruned graph", "",
              *_artefact_table(data), "", "## Latency (ms, median)", "", *_latency_table(data)]
    errors = [(n, k, v) for n, rec in data["models"].items() for k, v in rec.get("errors", {}).items()]
    if errors:
        lines += ["", "## Errors", "", *common.table(("model", "what", "error"), errors).splitlines()]
    lines += ["", *_targets(data, table), ""]
    return "\n".join(lines)


def _load(meta: dict[str, Any]) -> str:
    start = meta.get("env", {}).get("loadavg_at_start", ["?"])[0]
    end = meta.get("loadavg_at_end", ["?"])[0] if meta.get("loadavg_at_end") else "?"
    return f"{start} at start, {end} at end"


def _efficiency_table(table: list[dict[str, Any]], batch: int) -> list[str]:
    header = ("model", "variant", "MACs reduction", *RUNTIMES)
    keyed = {(r["model"], r["variant"], r["runtime"]): r for r in table if r["batch"] == batch}
    out = []
    for model, variant in sorted({(m, v) for m, v, _ in keyed}, key=_order):
        cells = [keyed.get((model, variant, rt)) for rt in RUNTIMES]
        reduction = next(c["macs_reduction"] for c in cells if c)
        out.append((model, variant, f"{reduction:.2f}×",
                    *[f"{c['efficiency']:.2f} ({c['speedup']:.2f}×)" if c else "—" for c in cells]))
    return common.table(header, out).splitlines() if out else ["(no measurements yet)"]


def _order(key: tuple) -> tuple:
    model, variant = key[0], key[1]
    order = list(FP32) + list(INT8)
    return (MODELS.index(model) if model in MODELS else 99, order.index(variant) if variant in order else 99)


def _round_to_table(data: dict[str, Any]) -> list[str]:
    out = []
    for name, rec in data["models"].items():
        lat = rec.get("latency_ms", {})
        for variant in (v for v in FP32 if "_r" in v):
            pairs = [[_ratio(lat, variant, variant.split("_")[0], rt, b) for b in (16, 1)] for rt in RUNTIMES]
            if any(p is not None for pair in pairs for p in pair):
                out.append((name, variant, *(" / ".join("—" if p is None else f"{p:.2f}" for p in pair)
                                             for pair in pairs)))
    return common.table(("model", "variant", *RUNTIMES), out).splitlines() if out else ["(no measurements yet)"]


def _ratio(lat: dict, variant: str, base: str, runtime: str, batch: int):
    a, b = lat.get(f"{variant}/{runtime}/b{batch}"), lat.get(f"{base}/{runtime}/b{batch}")
    return a["median"] / b["median"] if a and b else None


def _artefact_table(data: dict[str, Any]) -> list[str]:
    out = []
    for name, rec in data["models"].items():
        arts = rec.get("artefacts", {})
        for key, a in sorted(arts.items(), key=lambda kv: (kv[0].split("/")[1], _order((name, kv[0].split("/")[0])))):
            variant, runtime = key.split("/")
            original = arts.get(f"original/{runtime}")
            ratio = a["size_bytes"] / original["size_bytes"] if original else None
            check = f"SQNR {a['sqnr_db']:.1f} dB" if "int8" in variant else f"rel. error {a['relative_error']:.1e}"
            batch = f"{a['batch'][0]}..{a['batch'][1]}" if a["batch"][0] != a["batch"][1] else f"{a['batch'][0]}"
            out.append((name, runtime, variant, f"{a['size_bytes'] / 1e6:.2f} MB", ratio, batch,
                        a["not_delegated"] if runtime == "executorch" else "—", check))
    header = ("model", "runtime", "variant", "size", "size / fp32 original", "batch", "ops not delegated",
              "vs pruned graph")
    return common.table(header, out).splitlines() if out else ["(no artefacts yet)"]


def _latency_table(data: dict[str, Any]) -> list[str]:
    out = []
    for name, rec in data["models"].items():
        lat = rec.get("latency_ms", {})
        for variant in [*FP32, *INT8]:
            cells = [lat.get(f"{variant}/{rt}/b{b}") for rt in RUNTIMES for b in (1, 16)]
            if any(cells):
                out.append((name, variant, *[f"{c['median']:.1f}" if c else "—" for c in cells]))
    header = ("model", "variant", *[f"{rt} b{b}" for rt in RUNTIMES for b in (1, 16)])
    return common.table(header, out).splitlines() if out else ["(no measurements yet)"]


def _targets(data: dict[str, Any], table: list[dict[str, Any]]) -> list[str]:
    cnn = [r for r in table if r["model"] in ("resnet50", "mobilenet_v2") and r["batch"] == 16
           and r["variant"] in ("p30", "p50", "p30+int8", "p50+int8")]
    low = [f"{r['model']} {r['variant']} {r['runtime']} {r['efficiency']:.2f}" for r in cnn if r["efficiency"] < 0.8]
    lines = ["## Targets", "",
             f"- speedup / MACs reduction ≥ 0.8 for the CNNs at batch 16: {len(cnn) - len(low)} of {len(cnn)} "
             f"measured cells meet it" + (f"; below: {', '.join(low)}" if low else ""),
             *_best_round_to(table)]
    for name, rec in data["models"].items():
        arts = rec.get("artefacts", {})
        a, b = arts.get("p50+int8/executorch"), arts.get("original/executorch")
        if a and b:
            lines.append(f"- {name}: 50% + int8 `.pte` is {a['size_bytes'] / b['size_bytes']:.2f}× the fp32 "
                         f"original's size (target ≤ 0.3)")
    bad = [f"{n} {k}" for n, rec in data["models"].items() for k, a in rec.get("artefacts", {}).items()
           if ("int8" in k and a["sqnr_db"] < 20) or ("int8" not in k and a["relative_error"] > 1e-4)]
    count = sum(len(rec.get("artefacts", {})) for rec in data["models"].values())
    lines.append(f"- outputs within tolerance (fp32: ≤ 1e-4 of the output scale; int8: SQNR ≥ 20 dB): "
                 f"{count - len(bad)} of {count} artefacts" + (f"; outside: {', '.join(bad)}" if bad else ""))
    if bad and all("original+int8" in b for b in bad):
        lines.append("  (only int8 of the unpruned random-weight originals: the baseline the pruned variants are "
                     "compared with, not a pruned output)")
    return lines


def _best_round_to(table: list[dict[str, Any]]) -> list[str]:
    """The CNNs' cells at batch 16 with the best round_to per model, sparsity, precision and runtime."""
    cells: dict[tuple, list[tuple[float, str]]] = {}
    for r in table:
        if r["model"] in ("resnet50", "mobilenet_v2") and r["batch"] == 16:
            base, plus, quant = r["variant"].partition("+")
            cell = (r["model"], base.split("_")[0] + plus + quant, r["runtime"])
            cells.setdefault(cell, []).append((r["efficiency"], r["variant"]))
    if not any(len(v) > 1 for v in cells.values()):
        return []
    best = {key: max(options) for key, options in cells.items()}
    low = [f"{m} {s} {rt} {e:.2f}" for (m, s, rt), (e, _) in best.items() if e < 0.8]
    return [f"- the same with the best round_to (1, 8 or 16; 1 or 16 for int8) per model, variant and runtime: "
            f"{len(best) - len(low)} of {len(best)} meet it" + (f"; below: {', '.join(low)}" if low else "")]


def plot(data: dict[str, Any]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    labels = ["p30", "p30_r16", "p50", "p50_r16", "p30+int8", "p50+int8"]
    table = [r for r in rows(data) if r["batch"] == 16 and r["variant"] in labels]
    models = [m for m in MODELS if any(r["model"] == m for r in table)]
    if not models:
        return
    fig, axes = plt.subplots(2, (len(models) + 1) // 2, figsize=(12, 7.6), dpi=100, squeeze=False)
    colors = dict(zip(RUNTIMES, ("#7f7f7f", "#ff7f0e", "#1f77b4", "#2ca02c")))
    for ax, model in zip(axes.flat, models):
        for i, rt in enumerate(RUNTIMES):
            vals = {r["variant"]: r["efficiency"] for r in table if r["model"] == model and r["runtime"] == rt}
            xs = [j + (i - 1.5) * 0.2 for j in range(len(labels))]
            ax.bar(xs, [vals.get(v, 0) for v in labels], width=0.2, color=colors[rt], label=rt)
        ax.axhline(0.8, color="red", linewidth=0.8, linestyle="--")
        ax.axhline(1.0, color="black", linewidth=0.5)
        ax.set_xticks(range(len(labels)), [label.replace("_r16", "\nround_to 16") for label in labels], fontsize=8)
        ax.set_title(f"{model}, batch 16")
        ax.set_ylabel("speedup / MACs reduction")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(PNG, metadata={"Software": None})
    plt.close(fig)


def write_outputs() -> None:
    data = load()
    _write(JSON, data)  # the per-model files merged: the .json alone rebuilds the table
    MD.write_text(markdown(data), encoding="utf-8")
    plot(data)
    print(MD.read_text())


# --- main ---------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--runtimes", nargs="+", choices=RUNTIMES, default=list(RUNTIMES))
    parser.add_argument("--batches", nargs="+", type=int, default=[16, 1])
    parser.add_argument("--image", type=int, default=224)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--repeat-heavy", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per model")
    parser.add_argument("--only", action="append", default=[], metavar="RUNTIME=V1,V2",
                        help="time only these variants in RUNTIME (e.g. executorch=original,p50,p50+int8)")
    parser.add_argument("--jobs", type=int, default=1, help="models run in parallel (one process each)")
    parser.add_argument("--quick", action="store_true", help="resnet18 at 64x64, 2 rounds")
    parser.add_argument("--fresh", action="store_true", help="drop earlier results of these models first")
    parser.add_argument("--table-only", action="store_true")
    parser.add_argument("--note", help="a paragraph about this run for the .md (kept in the .json)")
    parser.add_argument("--worker", nargs=1, metavar="MODEL", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.models, args.image, args.repeat, args.repeat_heavy = ["resnet18"], 64, 2, 1
    if args.worker:
        only = {rt: vs.split(",") for rt, _, vs in (o.partition("=") for o in args.only)}
        print(json.dumps(worker(args.worker[0], args.image, args.threads, args.runtimes, args.batches, args.repeat,
                                args.repeat_heavy, only)))
        return 0
    if not args.table_only:
        _sweep(args)
    if args.note:
        data = load()
        data["meta"]["note"] = args.note
        _write(JSON, data)
    write_outputs()
    return 0


def _sweep(args: argparse.Namespace) -> None:
    from concurrent.futures import ThreadPoolExecutor
    data = load()
    data["meta"] = {"env": common.environment(args.threads), "repeat": args.repeat, "jobs": args.jobs,
                    "repeat_heavy": args.repeat_heavy, "image": args.image, "batches": args.batches,
                    "only": args.only}
    for name in args.models if args.fresh else ():
        data["models"].pop(name, None)
        (ARTEFACTS / f"{name}.json").unlink(missing_ok=True)
    _write(JSON, data)
    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(lambda name: _run_model(args, name), args.models))
    data = load()
    data["meta"]["loadavg_at_end"] = list(os.getloadavg())
    _write(JSON, data)


def _run_model(args: argparse.Namespace, name: str) -> None:
    worker_args = [name, "--image", str(args.image), "--threads", str(args.threads), "--repeat", str(args.repeat),
                   "--repeat-heavy", str(args.repeat_heavy), "--runtimes", *args.runtimes,
                   "--batches", *map(str, args.batches), *[f"--only={o}" for o in args.only]]
    status = common.run_worker(Path(__file__), worker_args, args.timeout, mem_gb=12, threads=args.threads)
    print(f"{name}: {status.get('status')} in {status.get('wall_s')} s", flush=True)
    if status.get("status") != "ok":
        record(name, "errors", "worker", json.dumps(status)[:600])


if __name__ == "__main__":
    sys.exit(main())
