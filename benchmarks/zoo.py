"""The torchvision classification zoo, pruned and verified: regenerates ``benchmarks/zoo.md``.

Every model of ``torchvision.models.list_models(module=torchvision.models)`` (random weights, eval mode)
is pruned at 50% with L1, uniform, classifier output kept (the default), at the ``fx`` level (where
``torch.fx.symbolic_trace`` captures it) and at the ``export`` level. Each model and level runs in a
**fresh subprocess**, so a crash or a leak stays there and the child's ``ru_maxrss`` is its own peak.

Per row: status, parameters and MACs before/after (MACs from :func:`fxprune.stats.count_macs`, i.e.
``FlopCounterMode``), the model's own forward time, the time of each stage (capture, match, score and
select, rewrite), the peak resident memory of the prune against the memory of the model's tensors, and
the verify error (exact or approximate). The status is ``ok`` only when the pruned model runs, keeps the
output shape, has fewer parameters, passes ``fxprune.verify`` and the input model is byte-for-byte
unchanged; ``no-trace`` means ``symbolic_trace`` cannot capture the model (the fx level does not apply).

Results are kept in ``benchmarks/zoo.json`` (one record per model and level) and merged, so a partial
run (``--models``) updates its rows and the table is rebuilt from all records::

    python benchmarks/zoo.py                              # everything (about an hour on 2 cores)
    python benchmarks/zoo.py --models resnet18 'swin_*' --levels export
    python benchmarks/zoo.py --repeat 3                   # timings: median of 3 runs
    python benchmarks/zoo.py --table-only                 # rebuild zoo.md from zoo.json
    python benchmarks/zoo.py --worker resnet18 fx         # one run in this process, prints JSON

``benchmarks/`` is not an installed package; the script imports the installed ``fxprune``.
"""
from __future__ import annotations

import argparse
import fnmatch
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Optional

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import common  # noqa: E402
LEVELS = ("fx", "export")
SPARSITY = 0.5

#: The smallest square input each family accepts (default 64): ViT/MaxViT fix 224 in their
#: position embedding / partition sizes; Swin is run at 224 so its windows shift as designed.
SIZES = {"vit_": 224, "swin_": 224, "maxvit_": 224, "inception_v3": 75}
DEFAULT_SIZE = 64


def input_size(name: str) -> int:
    for prefix, size in SIZES.items():
        if name.startswith(prefix):
            return size
    return DEFAULT_SIZE


def zoo_models() -> list[str]:
    import torchvision
    return list(torchvision.models.list_models(module=torchvision.models))


def build(name: str) -> tuple[Any, tuple]:
    """A random-weight model in eval mode (:func:`common.random_model`) and its example input (both
    seeded)."""
    import torch
    model = common.random_model(name)
    size = input_size(name)
    return model, (torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1)),)


# --- the worker: one model, one level, in this process --------------------------------------------
def fingerprint(model: Any) -> tuple[str, str]:
    """A hash of every tensor's bytes (no copy of the weights) and the model's code, if any."""
    digest = hashlib.blake2b(digest_size=16)
    for key, value in model.state_dict(keep_vars=True).items():
        t = value.detach().contiguous()
        digest.update(f"{key}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(__import__("torch").uint8).numpy())
    return digest.hexdigest(), str(getattr(model, "code", ""))


def tensor_mb(model: Any) -> float:
    tensors = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values()) / 2 ** 20


def macs(model: Any, inputs: tuple) -> int:
    """MACs with nn.MultiheadAttention's eval fast path off: FlopCounterMode does not see inside
    ``torch._native_multi_head_attention``, which would hide ViT's projections and attention."""
    import torch
    from fxprune.stats import count_macs
    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        return count_macs(model, inputs)
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)


def used_params(gm: Any) -> int:
    """Parameters the graph reads: an export graph keeps a get_attr for every parameter of the model,
    even one no node uses (GoogLeNet's eval-mode aux heads), an fx graph only what it calls."""
    import torch
    seen: dict[int, int] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node.users:
            value = gm.get_parameter(node.target) if _is_param(gm, node.target) else None
            if value is not None:
                seen[id(value)] = value.numel()
        elif node.op == "call_module":
            seen.update({id(p): p.numel() for p in gm.get_submodule(node.target).parameters()})
    return sum(seen.values()) if seen else sum(p.numel() for p in gm.parameters() if isinstance(p, torch.Tensor))


def _is_param(gm: Any, target: str) -> bool:
    try:
        gm.get_parameter(target)
        return True
    except AttributeError:
        return False


def no_rule_reasons(analysis: Any) -> list[str]:
    """Distinct 'no rule for ...' reasons among frozen units (what keeps channels for lack of a rule)."""
    return sorted({r for g in analysis.groups for r in g.reasons if "no rule for" in r})


def run_worker(name: str, level: str) -> dict[str, Any]:
    import torch
    from fxprune.analysis import AnalysisOptions, match
    from fxprune.api import PruneResult, finish, make_plan, verify
    from fxprune.capture import capture
    from fxprune.errors import CaptureError
    from fxprune.importance import score_groups
    from fxprune.select import Policy, select
    from fxprune.stats import count_params, current_rss_mb, measure

    torch.set_grad_enabled(False)
    model, inputs = build(name)
    record: dict[str, Any] = {"model": name, "level": level, "input": list(inputs[0].shape)}
    record["model_params"] = count_params(model)
    record["macs_before"] = macs(model, inputs)
    t0, c0 = time.perf_counter(), time.process_time()
    ref_shape = tuple(model(*inputs).shape)
    record.update(forward_s=time.perf_counter() - t0, forward_cpu_s=time.process_time() - c0)
    record["tensor_mb"] = tensor_mb(model)
    before = fingerprint(model)
    record["rss_base_mb"] = current_rss_mb()
    with measure() as mem:
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            captured = capture(model, inputs, level)
        except CaptureError as exc:
            record.update(status="no-trace", error=str(exc))
            return record
        t1 = time.perf_counter()
        analysis = match(captured.gm, captured.level, AnalysisOptions())
        t2 = time.perf_counter()
        scores = score_groups(analysis, analysis.groups, "l1")
        drop = select(analysis, scores, Policy(SPARSITY))
        plan = make_plan(analysis, drop, {"sparsity": SPARSITY, "criterion": "l1", "capture": level})
        t3 = time.perf_counter()
        pruned = finish(analysis, drop, inputs)
        t4, c4 = time.perf_counter(), time.process_time()
    record["params_before"] = used_params(captured.gm)
    record.update(prune_cpu_s=c4 - c0, capture_s=t1 - t0, match_s=t2 - t1, select_s=t3 - t2, rewrite_s=t4 - t3,
                  prune_s=t4 - t0, rss_peak_mb=mem.rss_peak_mb, maxrss_mb=mem.maxrss_mb)
    record["groups"] = len(analysis.groups)
    record["prunable_groups"] = sum(g.prunable for g in analysis.groups)
    record["no_rule"] = no_rule_reasons(analysis)
    del scores
    record["params_after"] = used_params(pruned)
    record["macs_after"] = macs(pruned, inputs)
    new_shape = tuple(pruned(*inputs).shape)
    report = verify(model, PruneResult(pruned, plan, analysis, drop, inputs), inputs)
    record.update(verify_abs=report.max_abs_error, verify_rel=report.max_rel_error,
                  exact=report.exact, verify_passed=report.passed)
    failures = []
    if new_shape != ref_shape:
        failures.append(f"output shape {new_shape} != {ref_shape}")
    if record["params_after"] >= record["params_before"]:
        failures.append("nothing pruned")
    if not report.passed:
        failures.append(str(report))
    if fingerprint(model) != before:
        failures.append("the input model changed")
    record["status"] = "ok" if not failures else "FAIL"
    if failures:
        record["error"] = "; ".join(failures)
    return record


def worker_main(name: str, level: str) -> int:
    import traceback
    try:
        record = run_worker(name, level)
    except Exception as exc:  # a crash is a result too: report it, with where it happened
        tb = traceback.extract_tb(exc.__traceback__)
        where = next((f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(tb)
                      if "/fxprune/" in f.filename), "")
        record = {"model": name, "level": level, "status": "CRASH",
                  "error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                           + (f" (at {where})" if where else "")}
    from fxprune.stats import peak_rss_mb
    record["process_maxrss_mb"] = peak_rss_mb()
    print(json.dumps(record), flush=True)
    return 0


# --- the driver: one subprocess per model and level --------------------------------------------------
def run_isolated(name: str, level: str, timeout_s: float) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, level]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired:
        return {"model": name, "level": level, "status": "TIMEOUT", "error": f"over {timeout_s:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode == 0 and lines:
        record = json.loads(lines[-1])
    else:
        record = {"model": name, "level": level, "status": "CRASH",
                  "error": f"exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:] or ''}"}
    record["wall_s"] = time.perf_counter() - t0
    return record


TIMED = ("forward_s", "forward_cpu_s", "prune_cpu_s", "capture_s", "match_s", "select_s", "rewrite_s", "prune_s", "rss_peak_mb",
         "maxrss_mb", "process_maxrss_mb", "wall_s")


def median_record(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The first run's outcome with the median of every timing and memory figure."""
    record = dict(runs[0])
    for key in TIMED:
        values = [r[key] for r in runs if isinstance(r.get(key), (int, float))]
        if values:
            record[key] = statistics.median(values)
    record["runs"] = len(runs)
    if any(r.get("status") != record.get("status") for r in runs):
        record["status_varies"] = sorted({r.get("status", "?") for r in runs})
    return record


def select_models(patterns: Optional[list[str]], names: list[str]) -> list[str]:
    if not patterns:
        return names
    chosen = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    unknown = [p for p in patterns if not any(fnmatch.fnmatchcase(n, p) for n in names)]
    if unknown:
        raise SystemExit(f"no torchvision model matches {unknown}")
    return chosen


def load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {"records": {}}


def save(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")


def progress(i: int, n: int, r: dict[str, Any]) -> str:
    if r.get("status") == "ok":
        detail = (f"params {r['params_after'] / r['params_before']:.2f}x  MACs "
                  f"{r['macs_after'] / max(r['macs_before'], 1):.2f}x  prune {r['prune_s']:.1f}s  "
                  f"peak {r.get('maxrss_mb', 0):.0f}MB  err {r['verify_rel']:.1e}")
    else:
        detail = r.get("error", "")[:160]
    return f"[{i}/{n}] {r['model']:22s} {r['level']:6s} {r['status']:8s} {detail}"


# --- the table -----------------------------------------------------------------------------------
def _m(n: Optional[float], unit: float = 1e6) -> str:
    return "" if n is None else f"{n / unit:.1f}" if n / unit < 100 else f"{n / unit:.0f}"


def _s(x: Optional[float]) -> str:
    return "" if x is None else f"{x:.2f}" if x < 10 else f"{x:.1f}"


def table_row(r: dict[str, Any]) -> str:
    if r.get("status") not in ("ok", "FAIL"):
        return f"| {r['model']} | {r['level']} | {r['status']} | {r.get('error', '')[:120]} |" + " |" * 9
    ratio = r["params_after"] / r["params_before"]
    macs = f"{_m(r['macs_before'])} → {_m(r['macs_after'])}"
    over = (r.get("maxrss_mb") or 0) - (r.get("rss_base_mb") or 0)
    err = f"{r['verify_rel']:.1e} {'exact' if r['exact'] else 'approx'}"
    status = r["status"] if r["status"] == "ok" else f"FAIL: {r.get('error', '')[:80]}"
    return (f"| {r['model']} | {r['level']} | {status} | {_m(r['params_before'])} → {_m(r['params_after'])}"
            f" ({ratio:.2f}) | {macs} | {_s(r['forward_s'])} | {_s(r['capture_s'])} | {_s(r['match_s'])} |"
            f" {_s(r['select_s'])} | {_s(r['rewrite_s'])} | {_s(r['prune_s'])} |"
            f" {r.get('maxrss_mb', 0):.0f} (+{max(over, 0):.0f} / {r['tensor_mb']:.0f}) | {err} |")


HEADER = ("| model | level | status | params M before → after (ratio) | MMACs before → after | forward s | capture s | match s "
          "| score+select s | rewrite s | prune s | peak RSS MB (+over base / tensors) | verify rel. error |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def summary(records: list[dict[str, Any]], models: list[str]) -> list[str]:
    lines = []
    for level in LEVELS:
        rows = [r for r in records if r["level"] == level]
        count = {s: sum(r["status"] == s for r in rows) for s in ("ok", "no-trace")}
        bad = [f"{r['model']} ({r['status']})" for r in rows if r["status"] not in ("ok", "no-trace")]
        missing = [m for m in models if not any(r["model"] == m for r in rows)]
        line = (f"- **{level}**: {count['ok']} of {len(models)} pruned and verified"
                + (f", {count['no-trace']} not traceable by `symbolic_trace`" if count["no-trace"] else ""))
        if bad:
            line += f"; failing: {', '.join(bad)}"
        if missing:
            line += f"; not run: {', '.join(missing)}"
        lines.append(line)
    return lines


def slowest(records: list[dict[str, Any]], n: int = 8) -> list[str]:
    ok = sorted((r for r in records if r["status"] == "ok"), key=lambda r: -r["prune_s"])[:n]
    return [f"- {r['model']} ({r['level']}): prune {r['prune_s']:.1f} s (forward {r['forward_s']:.2f} s; capture "
            f"{r['capture_s']:.1f}, match {r['match_s']:.1f}, score+select {r['select_s']:.1f}, rewrite "
            f"{r['rewrite_s']:.1f})" for r in ok]


def write_table(data: dict[str, Any], path: Path) -> None:
    models = zoo_models()
    records = [data["records"][k] for k in sorted(data["records"], key=_order(models))]
    no_rule = sorted({f"{r['level']}: {reason}" for r in records for reason in r.get("no_rule", [])})
    meta = data.get("meta", {})
    text = [
        "# The torchvision zoo, pruned and verified",
        "",
        "Generated by `python benchmarks/zoo.py` (do not edit by hand). Every classification model of "
        "`torchvision.models.list_models(module=torchvision.models)`, random weights, eval mode, pruned at "
        f"{SPARSITY:.0%} with L1, uniform, classifier output kept; `fx` = `symbolic_trace` graph, `export` = "
        "`torch.export` ATen graph. Input 1×3×64×64 except ViT/Swin/MaxViT (224) and inception_v3 (75).",
        "",
        f"Machine: {meta.get('machine', '?')}; torch {meta.get('torch', '?')}, torchvision "
        f"{meta.get('torchvision', '?')}. Timings are the median of {meta.get('repeat', 1)} run(s) each in a "
        "fresh process, on a shared machine: read them as orders of magnitude.",
        "",
        "Columns: *status* `ok` = runs, same output shape, fewer parameters, `fxprune.verify` passed, input "
        "model unchanged. *params* counts the parameters the graph reads (an export graph also holds unused "
        "ones, e.g. GoogLeNet's and Inception's eval-mode aux heads; an fx graph drops them). *prune s* = capture + match + score+select + rewrite (rewrite includes refreshing "
        "the traced values). *peak RSS* is the process' peak during the prune, with how much it rose over the "
        "model already in memory and the size of the model's tensors. *verify rel. error* is the largest "
        "difference to the original model with the dropped channels zeroed, relative to the output's "
        "scale; `approx` groups pass through LayerNorm/GroupNorm(1) statistics and are reported, not failed.",
        "",
        "## Summary",
        "",
        *summary(records, models),
        "",
        "Slowest prunes:",
        "",
        *slowest(records),
        "",
        "## Results",
        "",
        HEADER,
        *[table_row(r) for r in records],
        "",
    ]
    if no_rule:
        text += ["## Channels kept for lack of a rule", "",
                 "Ops without a rule freeze the channels they touch (correct, but those channels cannot "
                 "shrink):", "", *[f"- {line}" for line in no_rule], ""]
    path.write_text("\n".join(text))


def _order(models: list[str]):
    index = {m: i for i, m in enumerate(models)}
    return lambda key: (index.get(key.split("/")[0], 10 ** 6), LEVELS.index(key.split("/")[1]))


def main(argv: Optional[Iterable[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="*", help="names or fnmatch patterns (default: the whole zoo)")
    parser.add_argument("--levels", nargs="*", choices=LEVELS, default=list(LEVELS))
    parser.add_argument("--repeat", type=int, default=1, help="runs per model and level (median timings)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per run")
    parser.add_argument("--json", type=Path, default=HERE / "zoo.json")
    parser.add_argument("--out", type=Path, default=HERE / "zoo.md")
    parser.add_argument("--table-only", action="store_true", help="rebuild the table from --json")
    parser.add_argument("--worker", nargs=2, metavar=("MODEL", "LEVEL"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker_main(*args.worker)
    data = load(args.json)
    if not args.table_only:
        import torch
        import torchvision
        data["meta"] = {"machine": f"{platform.machine()}, {os.cpu_count()} CPU cores", "torch": torch.__version__,
                        "torchvision": torchvision.__version__, "repeat": args.repeat}
        names = select_models(args.models, zoo_models())
        jobs = [(n, level) for n in names for level in args.levels]
        for i, (name, level) in enumerate(jobs, 1):
            runs = [run_isolated(name, level, args.timeout) for _ in range(args.repeat)]
            record = median_record(runs)
            data["records"][f"{name}/{level}"] = record
            print(progress(i, len(jobs), record), flush=True)
            save(args.json, data)
    write_table(data, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
