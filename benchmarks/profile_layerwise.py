"""Where the layer-by-layer data path spends its memory and time (issue 20's profile).

Writes a random bf16 checkpoint of ``bench_out_of_core.py``'s 1B shape cut to ``--layers`` layers with
its writer (cached in a temporary folder), runs ``fxprune.hf.prune_checkpoint`` with ``flap`` + ``reconstruct`` on
``--batches`` sequences of 128 random tokens, samples the RSS every 50 ms and prints the peak, the
phase it fell in (the functions entered and left around it) and the RSS at each phase, then the top of
a cProfile by own time. ``--data-free``: the same for the data-free disk-to-disk path (``l2``).

    nice python benchmarks/profile_layerwise.py --layers 6 --batches 1
"""
from __future__ import annotations

import argparse
import bisect
import cProfile
import functools
import os
import pstats
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from bench_out_of_core import write_checkpoint  # noqa: E402
from fxprune.hf import checkpoint, layerwise, prune_checkpoint  # noqa: E402
import fxprune.data.recovery as recovery  # noqa: E402

SPARSITY = {"intermediate_size": 0.25, "num_attention_heads": 0.5}  # bench_out_of_core's LAYERWISE_SPARSITY
#: The functions whose entry and exit mark the phases.
PHASES = ((checkpoint, "_analyse"), (layerwise, "statistics"), (checkpoint, "make_checkpoint_plan"),
          (layerwise, "walk_moments"), (recovery, "refit_layer"), (checkpoint, "_write_unit"))


def rss_bytes() -> int:
    """This process's resident set (Linux: /proc/self/statm, in pages)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def marked(marks: list, module, name: str) -> None:
    function = getattr(module, name)

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        marks.append((time.time(), f"enter {name}"))
        try:
            return function(*args, **kwargs)
        finally:
            marks.append((time.time(), f"exit {name}"))
    setattr(module, name, wrapper)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--batches", type=int, default=1)
    parser.add_argument("--data-free", action="store_true",
                        help="profile the data-free disk-to-disk path instead (25%% of every width, l2)")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "fxprune-profile-layerwise")
    args = parser.parse_args()
    src, out = args.cache / f"src-1b-{args.layers}l", args.cache / "out"
    if not (src / "model.safetensors.index.json").is_file():
        write_checkpoint(f"1b-{args.layers}l", src)  # bench_out_of_core's 1B shape, cut to --layers
    shutil.rmtree(out, ignore_errors=True)
    marks: list = []
    for module, name in PHASES:
        marked(marks, module, name)
    samples, running = [], [True]

    def sample() -> None:  # RSS only: reading the main thread's frames from here breaks torch.export
        while running[0]:
            samples.append((time.time(), rss_bytes()))
            time.sleep(0.05)
    threading.Thread(target=sample, daemon=True).start()
    generator = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, 128256, (1, 128), generator=generator),) for _ in range(args.batches)]
    profile, start = cProfile.Profile(), time.time()
    profile.enable()
    report = prune_checkpoint(src, out, 0.25, "l2") if args.data_free else \
        prune_checkpoint(src, out, SPARSITY, "flap", calibration=batches, recover="reconstruct")
    profile.disable()
    running[0] = False
    timings = {k: v for k, v in report["timings"].items() if k != "reconstruct"}
    print(f"wall {time.time() - start:.1f} s; timings {timings}")
    peak_time, peak = max(samples, key=lambda s: s[1])
    print(f"peak RSS {peak / 2**30:.2f} GiB at {peak_time - start:.1f} s, after "
          f"{[(round(t - start, 1), m) for t, m in marks if t <= peak_time][-3:]}")
    times = [t for t, _ in samples]
    for at, mark in marks:
        rss = samples[min(len(samples) - 1, bisect.bisect(times, at))][1]
        print(f"{at - start:8.1f} s  {rss / 2**30:5.2f} GiB  {mark}")
    pstats.Stats(profile).sort_stats("tottime").print_stats(15)
    shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
