"""cProfile of one ``fxprune.prune`` call: where the time goes, by file:function.

    python benchmarks/profile_prune.py --model resnet50 --image 224
    python benchmarks/profile_prune.py --blocks 2000          # bench_scaling's synthetic residual network
    python benchmarks/profile_prune.py --model resnet50 --capture export --top 30

One warm-up call, then the profiled call (threads pinned, 1 by default). Prints the stage split (capture,
match, score, select, rewrite + refresh), then the top functions by *own* time and by cumulative time
inside fxprune, each with its share of the profiled call; ``--out FILE`` also writes the report there.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import common  # noqa: E402


def _short(path: str) -> str:
    for marker in ("/fxprune/", "/torch/", "/site-packages/"):
        if marker in path:
            return marker.strip("/") + "/" + path.split(marker, 1)[1]
    return path


def report(stats: pstats.Stats, total: float, top: int) -> str:
    rows = []
    for (path, line, func), (cc, nc, tt, ct, _) in stats.stats.items():  # type: ignore[attr-defined]
        rows.append((tt, ct, nc, f"{_short(path)}:{line}({func})"))
    out = [f"profiled call: {total:.3f} s (under cProfile)", "", f"top {top} by own time:",
           "  share   own s   cum s    calls  function"]
    for tt, ct, nc, name in sorted(rows, reverse=True)[:top]:
        out.append(f"  {tt / total:5.1%} {tt:7.3f} {ct:7.3f} {nc:8d}  {name}")
    out += ["", f"top {top} fxprune functions by cumulative time:", "  share   cum s    calls  function"]
    ours = [r for r in rows if r[3].startswith("fxprune/")]
    for tt, ct, nc, name in sorted(ours, key=lambda r: -r[1])[:top]:
        out.append(f"  {ct / total:5.1%} {ct:7.3f} {nc:8d}  {name}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="torchvision model name")
    parser.add_argument("--blocks", type=int, default=None, help="synthetic residual network of N blocks")
    parser.add_argument("--image", type=int, default=None)
    parser.add_argument("--capture", default="fx", choices=("fx", "export"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--top", type=int, default=20)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    import torch
    import fxprune
    common.pin_threads(args.threads)
    if args.blocks:
        from bench_scaling import residual_net
        model, size, what = residual_net(args.blocks, 8), args.image or 8, f"residual net, {args.blocks} blocks"
    else:
        import torchvision
        torch.manual_seed(0)
        name = args.model or "resnet50"
        model, size, what = torchvision.models.get_model(name, weights=None).eval(), args.image or 224, name
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))
    t0 = time.perf_counter()
    fxprune.prune(model, (x,), sparsity=0.5, capture=args.capture)
    warm_up = time.perf_counter() - t0
    profiler = cProfile.Profile()
    t0 = time.perf_counter()
    profiler.enable()
    fxprune.prune(model, (x,), sparsity=0.5, capture=args.capture)
    profiler.disable()
    total = time.perf_counter() - t0
    stats = pstats.Stats(profiler, stream=io.StringIO())
    text = (f"# fxprune.prune profile: {what}, {size}x{size}, capture={args.capture}, {args.threads} thread(s)\n"
            f"first call (unprofiled): {warm_up:.3f} s\n" + report(stats, total, args.top))
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
