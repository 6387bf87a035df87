"""Does fxprune's cost grow linearly with the graph? Synthetic residual networks from 10 to 2,000 blocks.

Network: a stem conv, then ``N`` blocks ``x + relu(bn(conv3x3(x)))`` (each block one conv, one BN, one
ReLU and one residual add: 4 graph nodes, all in one residual channel space, plus the conv's own), then a
global pool and a classifier; ``--channels`` wide (8) on a ``--image`` input (8x8), so the arithmetic is
negligible and what is measured is the analysis itself.

Per N, in a fresh subprocess (timeout + memory cap, threads pinned):

* fxprune ``analyze`` (capture + match: the groups) and the whole ``prune`` at 50%;
* Torch-Pruning's ``DependencyGraph().build_dependency`` (its analysis) and the whole ``BasePruner`` step
  (``GroupMagnitudeImportance(p=1)``, classifier ignored), each child capped by ``--tp-timeout``
  (once a size times out, larger sizes are skipped).

The first call is ``cold``; then ``--repeat`` more calls give the ``warm`` median. Reported: seconds and
microseconds per graph node (the fx graph's node count), and the peak RSS increase over the process
before the network was built. The flatness target: fxprune's warm time per node varies at most 1.5x
from 10 to 2,000 blocks.

    python benchmarks/bench_scaling.py                  # N = 10 30 100 300 1000 2000
    python benchmarks/bench_scaling.py --quick          # N = 10 100 300, 1 repeat
    python benchmarks/bench_scaling.py --table-only
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import common  # noqa: E402

SECTION = "bench_scaling"
BLOCKS = (10, 30, 100, 300, 1000, 2000)
TOOLS = ("fxprune-analyze", "fxprune-prune", "tp-depgraph", "tp-prune")


def residual_net(blocks: int, channels: int):
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
            self.bn = nn.BatchNorm2d(channels)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + torch.relu(self.bn(self.conv(x)))

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, channels, 3, padding=1)
            self.blocks = nn.Sequential(*[Block() for _ in range(blocks)])
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(channels, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.pool(self.blocks(self.stem(x))).flatten(1))

    torch.manual_seed(0)
    return Net().eval()


def _call(tool: str, model: Any, x: Any) -> Callable[[], Any]:
    import fxprune
    if tool == "fxprune-analyze":
        return lambda: fxprune.analyze(model, (x,))
    if tool == "fxprune-prune":
        return lambda: fxprune.prune(model, (x,), sparsity=0.5)
    import torch_pruning as tp
    if tool == "tp-depgraph":
        return lambda: tp.DependencyGraph().build_dependency(model, example_inputs=(x,))
    return lambda: tp.pruner.BasePruner(model, (x,), importance=tp.importance.GroupMagnitudeImportance(p=1),
                                        pruning_ratio=0.5, ignored_layers=[model.fc]).step()


def worker(tool: str, blocks: int, channels: int, image: int, repeat: int, threads: int) -> dict[str, Any]:
    import torch
    from fxprune.measure import current_rss_mb, measure
    common.pin_threads(threads)
    if tool.startswith("tp-"):
        import torch_pruning  # noqa: F401
    gc.collect()
    base = current_rss_mb()
    x = torch.randn(1, 3, image, image, generator=torch.Generator().manual_seed(1))
    nodes = len(torch.fx.symbolic_trace(residual_net(blocks, channels)).graph.nodes)
    times, peak = [], 0.0
    for _ in range(1 + repeat):
        model = residual_net(blocks, channels)  # TP prunes in place: a fresh model every call
        for p in model.parameters():
            p.requires_grad_(True)
        fn = _call(tool, model, x)
        with measure(interval_s=0.005) as m:
            fn()
        times.append(m.wall_s)
        peak = max(peak, m.rss_peak_mb or 0.0, m.maxrss_mb if m.raised_maxrss else 0.0)
        del model, fn
        gc.collect()
    warm = statistics.median(times[1:]) if repeat else times[0]
    return {"tool": tool, "blocks": blocks, "nodes": nodes, "status": "ok", "cold_s": times[0], "warm_s": warm,
            "warm_us_per_node": warm / nodes * 1e6, "cold_us_per_node": times[0] / nodes * 1e6,
            "peak_delta_mb": peak - (base or 0.0), "all_s": [round(t, 4) for t in times]}


def markdown(section: dict[str, Any]) -> str:
    meta, rows = section["meta"], section["rows"]
    env = meta.get("env", {})
    lines = ["# bench_scaling: analysis cost vs graph size (synthetic residual networks)", "",
             f"Generated by `python benchmarks/bench_scaling.py` ({meta.get('date')}, torch {env.get('torch')}, "
             f"Torch-Pruning {env.get('torch_pruning')}, {env.get('threads')} thread(s), load average at start "
             f"{env.get('loadavg_at_start', ['?'])[0]}; {meta.get('channels')} channels, "
             f"{meta.get('image')}x{meta.get('image')} input; warm = median of {meta.get('repeat')} calls after the "
             "first). us/node = warm seconds / fx graph nodes. Peak = RSS increase over the process before the "
             "network was built.", ""]
    tools = [t for t in TOOLS if any(t in r for r in rows.values())]
    header = ["blocks", "nodes"] + [f"{t} {k}" for t in tools for k in ("warm s", "us/node", "peak MB")]
    body = []
    for key in sorted(rows, key=lambda k: int(k)):
        row = rows[key]
        cells: list[Any] = [int(key), next((r.get("nodes") for r in row.values() if r.get("nodes")), None)]
        for t in tools:
            r = row.get(t, {})
            if r.get("status") == "ok":
                cells += [r["warm_s"], r["warm_us_per_node"], r["peak_delta_mb"]]
            else:
                cells += [r.get("status", "—"), None, None]
        body.append(cells)
    lines.append(common.table(header, body))
    runs = sorted({(t, r.get("date", "?"), r.get("git", "?")) for row in rows.values() for t, r in row.items()})
    lines += ["", "Measured (tool, date, commit): " + "; ".join(f"{t} {d} {g}" for t, d, g in
                                                           sorted({(t, d, g) for t, d, g in runs}))]
    lines += ["", "Flatness (max / min warm us/node over the blocks measured; target for fxprune <= 1.5):", ""]
    for t in tools:
        per = [rows[k][t]["warm_us_per_node"] for k in rows if rows[k].get(t, {}).get("status") == "ok"]
        if per:
            lines.append(f"- {t}: {max(per) / min(per):.2f} (min {min(per):.0f}, max {max(per):.0f} us/node, "
                         f"{len(per)} sizes)")
            big = [rows[k][t]["warm_us_per_node"] for k in rows
                   if int(k) >= 30 and rows[k].get(t, {}).get("status") == "ok"]
            if big and len(big) < len(per):
                lines.append(f"  - from 30 blocks up: {max(big) / min(big):.2f}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", nargs="+", type=int, default=list(BLOCKS))
    parser.add_argument("--tools", nargs="+", default=list(TOOLS), choices=TOOLS)
    parser.add_argument("--channels", type=int, default=8)
    parser.add_argument("--image", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per fxprune child (all its calls)")
    parser.add_argument("--tp-timeout", type=float, default=300.0,
                        help="seconds per Torch-Pruning child (all its calls); a timeout skips larger N")
    parser.add_argument("--mem-gb", type=float, default=8.0)
    parser.add_argument("--quick", action="store_true", help="smoke run: 10, 100 and 300 blocks, 1 repeat")
    parser.add_argument("--table-only", action="store_true")
    parser.add_argument("--worker", nargs=2, metavar=("TOOL", "BLOCKS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.quick:
        args.blocks, args.repeat = [10, 100, 300], 1
    if args.worker:
        print(json.dumps(worker(args.worker[0], int(args.worker[1]), args.channels, args.image, args.repeat,
                                args.threads)))
        return 0
    if args.table_only:
        section = common.load_results()[SECTION]
    else:
        rows: dict[str, Any] = {}
        skip: set[str] = set()
        for blocks in args.blocks:
            rows[str(blocks)] = {}
            for tool in args.tools:
                if tool in skip:  # a smaller network already timed out or ran out of memory
                    rows[str(blocks)][tool] = {"status": "skipped (smaller N failed)"}
                    continue
                timeout = args.tp_timeout if tool.startswith("tp-") else args.timeout
                rec = common.run_worker(Path(__file__), [tool, str(blocks), "--channels", str(args.channels),
                                                         "--image", str(args.image), "--repeat", str(args.repeat),
                                                         "--threads", str(args.threads)],
                                        timeout, args.mem_gb, args.threads)
                rec.update(date=time.strftime("%Y-%m-%d %H:%M"), git=common._git_head())
                if rec.get("status") != "ok":
                    skip.add(tool)
                rows[str(blocks)][tool] = rec
                print(json.dumps({k: v for k, v in rec.items() if k != "stderr_tail"}), flush=True)
        meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "repeat": args.repeat, "channels": args.channels,
                "image": args.image, "env": common.environment(args.threads)}
        data = common.load_results().get(SECTION, {}).get("rows", {})
        for key, value in rows.items():  # merge per tool within a size
            rows[key] = {**data.get(key, {}), **value}
        section = common.save_section(SECTION, meta, rows)
    (HERE / "bench_scaling.md").write_text(markdown(section))
    print((HERE / "bench_scaling.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
