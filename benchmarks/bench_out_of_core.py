"""Pruning a checkpoint bigger than memory, disk to disk (issue 20): time, peak memory and bytes moved.

The script writes its own checkpoints once (random bf16 weights, std 0.02, shards of at most 2 GB, a
``config.json``) into a cache folder it removes at the end (``--keep`` keeps it for a rerun):

* ``1b``: Llama-3.2-1B-shaped: hidden 2048, 16 layers, intermediate 8192, 32 heads / 8 KV heads, vocab
  128256, tied embeddings (1.24 B parameters, 2.5 GB);
* ``8b``: Llama-3-8B-shaped: hidden 4096, 32 layers, intermediate 14336, 32 heads / 8 KV heads, vocab
  128256 (8.03 B parameters, 16.1 GB).

Each measurement runs in a fresh process (``common.run_worker``, 2 threads, ``nice``) that reports its
own wall time and peak RSS (``ru_maxrss``: resident memory, file pages mapped included):

* ``structure once`` / ``structure each``: the meta-device model from ``config.json``, exported and
  analysed, with identical layers analysed once (three layers, expanded) or every layer (today's way);
* ``disk to disk``: :func:`fxprune.hf.prune_checkpoint`, ``l2`` (data-free), 25% of every kind of width
  (hidden size, KV heads 8 -> 6, intermediate; at 20% the hidden size is no multiple of the head count,
  which transformers refuses);
* ``I/O floor``: safetensors alone moving the same bytes: every tensor read (``safe_open``), then the
  output's tensors (the same shapes, leading slices) written shard by shard;
* ``in memory`` (1b only): ``from_pretrained`` + :func:`fxprune.hf.prune` + ``save_pretrained``; its
  tensors are compared with the disk-to-disk output's, one at a time.

The source files were just written, so their pages may be in the page cache for the first reader: the
floor runs first, so it gets no advantage over the prune.

``--only layerwise``: the data path, ``flap`` + ``reconstruct`` layer by layer from disk
(:mod:`fxprune.hf.layerwise`, ``--calib N``x``L`` random token windows, 25% of the MLP and half the KV
heads), against :func:`fxprune.hf.prune` with the same options and batches in memory; the two outputs
are compared tensor by tensor to float tolerance. ``--layers`` cuts the model's depth (``1b`` with 4
layers runs here in minutes; the issue's 16 layers with 32x256 tokens do not: each refit of a
down_proj is a float64 Gram of 6144 columns); ``--device cuda`` runs the layers on a GPU (a GPU
machine can run ``--only layerwise --device cuda --calib 32x256``).

    nice -n 10 python benchmarks/bench_out_of_core.py --models 1b 8b   # writes bench_out_of_core.md/.png
    nice -n 10 python benchmarks/bench_out_of_core.py --only structure  # the structure rows alone
    nice -n 10 python benchmarks/bench_out_of_core.py --models 1b --only layerwise --layers 4 --calib 8x128
    python benchmarks/bench_out_of_core.py --table-only
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import environment, load_results, run_worker, save_section, table  # noqa: E402

SECTION = "bench_out_of_core"
#: 25%, not the issue's 20%: at 20% LLaMA's hidden size becomes 1638 / 3277 for 24 heads, and
#: transformers refuses a config whose hidden size is not a multiple of the head count.
SPARSITY, CRITERION, THREADS = 0.25, "l2", 2
MODELS = {
    "1b": dict(hidden_size=2048, num_hidden_layers=16, intermediate_size=8192, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "8b": dict(hidden_size=4096, num_hidden_layers=32, intermediate_size=14336, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
}
SHARD_BYTES = 2 << 30
#: The data path's widths: the MLP and half the KV heads (8 -> 4: 24 heads would not divide the hidden
#: size, which transformers refuses; hidden kept: a refitted lm_head would need a bias
#: LLaMA's config has no flag for).
LAYERWISE_SPARSITY = {"intermediate_size": 0.25, "num_attention_heads": 0.5}


# --- workers -----------------------------------------------------------------------------------------
def _peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB -> GiB


def _cpu_s() -> float:
    """CPU seconds of this process (user + system): on a shared, loaded machine a steadier figure than
    wall time, which counts the time other processes hold the cores."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def write_checkpoint(name: str, directory: Path) -> dict:
    """Random bf16 tensors, shard by shard (one shard in memory at a time), then the index and config."""
    import torch
    from safetensors.torch import save_file
    from fxprune.hf.checkpoint import meta_model
    config = _config(name)
    directory.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(directory)
    model = meta_model(directory)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items() if k != "lm_head.weight"
              or not config.tie_word_embeddings}
    shards, current, size = [], [], 0
    for key, shape in shapes.items():
        nbytes = 2 * _numel(shape)
        if current and size + nbytes > SHARD_BYTES:
            shards.append(current)
            current, size = [], 0
        current.append(key)
        size += nbytes
    shards.append(current)
    generator = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    for i, keys in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {k: _random(shapes[k], k, generator) for k in keys}
        save_file(tensors, str(directory / f".{file}.tmp"), metadata={"format": "pt"})
        os.replace(directory / f".{file}.tmp", directory / file)
        weight_map.update({k: file for k in keys})
        total += sum(t.numel() * 2 for t in tensors.values())
    (directory / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    return {"bytes": total, "shards": len(shards)}


def _config(name: str) -> Any:
    """``1b``, ``8b``, or ``1b-4l``: a shape with its depth cut to 4 layers."""
    import transformers
    base, _, layers = name.partition("-")
    fields = {**MODELS[base], **({"num_hidden_layers": int(layers.rstrip("l"))} if layers else {})}
    return transformers.LlamaConfig(**fields, max_position_embeddings=8192, dtype="bfloat16",
                                    architectures=["LlamaForCausalLM"])


def _random(shape: tuple, key: str, generator: Any) -> Any:
    import torch
    if len(shape) == 1:
        return torch.ones(shape, dtype=torch.bfloat16)  # norm scales
    return (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)


def _numel(shape: tuple) -> int:
    out = 1
    for s in shape:
        out *= s
    return out


def structure(src: Path, once: bool) -> dict:
    from fxprune.hf.checkpoint import analyse_structure, meta_model
    tic = time.perf_counter()
    model = meta_model(src)
    built, cpu = time.perf_counter(), _cpu_s()
    analysis = analyse_structure(model, blocks_once=once)
    return {"wall_s": time.perf_counter() - tic, "analyse_s": time.perf_counter() - built,
            "analyse_cpu_s": _cpu_s() - cpu, "cpu_s": _cpu_s(), "peak_gb": _peak_gb(),
            "groups": len(analysis.groups)}


def disk_to_disk(src: Path, out: Path) -> dict:
    from fxprune.hf import prune_checkpoint
    tic = time.perf_counter()
    report = prune_checkpoint(src, out, SPARSITY, CRITERION)
    return {"wall_s": time.perf_counter() - tic, "cpu_s": _cpu_s(), "peak_gb": _peak_gb(),
            "bytes_read": report["bytes_read"],
            "score_bytes_read": report["timings"].get("score_bytes_read", 0),
            "bytes_written": report["bytes_written"], "timings": report["timings"]}


def io_floor(src: Path, reference: Path, out: Path) -> dict:
    """safetensors alone: read every source tensor, write the reference output's shapes (leading slices)."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    tic = time.perf_counter()
    source = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    target = json.loads((reference / "model.safetensors.index.json").read_text())["weight_map"]
    shapes = {}
    for file in sorted(set(target.values())):
        with safe_open(str(reference / file), "pt") as f:
            shapes.update({k: f.get_slice(k).get_shape() for k in f.keys()})
    out.mkdir(parents=True)
    read = written = 0
    for file in sorted(set(source.values())):
        tensors = {}
        with safe_open(str(src / file), "pt") as f:
            for key in f.keys():
                tensor = f.get_tensor(key)
                read += tensor.numel() * tensor.element_size()
                for dim, size in enumerate(shapes[key]):
                    tensor = tensor.narrow(dim, 0, size)
                tensors[key] = tensor.contiguous()
        save_file(tensors, str(out / file))
        written += sum(t.numel() * t.element_size() for t in tensors.values())
        del tensors
    return {"wall_s": time.perf_counter() - tic, "cpu_s": _cpu_s(), "peak_gb": _peak_gb(), "bytes_read": read,
            "bytes_written": written}


def in_memory(src: Path, out: Path) -> dict:
    import torch
    import transformers
    import fxprune.hf
    tic = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16).eval()
    ids = torch.randint(0, 1000, (2, 16))
    pruned = fxprune.hf.prune(model, (ids,), SPARSITY, CRITERION)
    pruned.save_pretrained(out)
    return {"wall_s": time.perf_counter() - tic, "cpu_s": _cpu_s(), "peak_gb": _peak_gb()}


def _calibration(spec: str, vocab: int) -> list:
    import torch
    count, length = (int(x) for x in spec.split("x"))
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab, (1, length), generator=generator) for _ in range(count)]


def layerwise(src: Path, out: Path, calib: str, device: str) -> dict:
    """flap + reconstruct layer by layer from disk."""
    from fxprune.hf.checkpoint import meta_model, prune_checkpoint
    tic = time.perf_counter()
    batches = _calibration(calib, meta_model(src).config.vocab_size)
    report = prune_checkpoint(src, out, LAYERWISE_SPARSITY, "flap", calibration=batches, recover="reconstruct",
                              device=device)
    return {"wall_s": time.perf_counter() - tic, "cpu_s": _cpu_s(), "peak_gb": _peak_gb(),
            "bytes_read": report["bytes_read"], "bytes_written": report["bytes_written"],
            "timings": report["timings"]}


def layerwise_in_memory(src: Path, out: Path, calib: str) -> dict:
    import torch
    import transformers
    import fxprune.hf
    tic = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16).eval()
    batches = _calibration(calib, model.config.vocab_size)
    pruned = fxprune.hf.prune(model, (batches[0],), LAYERWISE_SPARSITY, "flap", calibration=batches,
                              recover="reconstruct")
    pruned.save_pretrained(out)
    return {"wall_s": time.perf_counter() - tic, "cpu_s": _cpu_s(), "peak_gb": _peak_gb()}


#: A tied tensor one writer stores and the other does not (save_pretrained writes both names).
TIES = {"lm_head.weight": "model.embed_tokens.weight"}


def compare(a: Path, b: Path) -> dict:
    """Whether two checkpoints hold the same tensors (read one at a time; a tied name one side leaves
    out is compared with the tensor it is tied to)."""
    import torch
    from fxprune.hf.checkpoint import Shards
    left, right = Shards.open(a), Shards.open(b)
    pairs = [(k, k if k in right.shapes else TIES.get(k)) for k in left.shapes]
    pairs += [(TIES.get(k), k) for k in right.shapes if k not in left.shapes]
    present = all(x in left.shapes and y in right.shapes for x, y in pairs)
    worst = max((float((left.read(x).float() - right.read(y).float()).abs().max()) for x, y in pairs
                 if x in left.shapes and y in right.shapes), default=0.0) if present else float("inf")
    return {"equal": present and worst == 0.0, "max_abs_diff": worst, "tensors": len(pairs)}


def worker(argv: list[str]) -> None:
    import torch
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", THREADS)))  # --threads, through run_worker
    task, *paths = argv
    args = [Path(p) for p in paths[1:]]
    result = {"write": lambda: write_checkpoint(paths[0], args[0]),
              "structure-once": lambda: structure(args[0], True),
              "structure-each": lambda: structure(args[0], False),
              "disk-to-disk": lambda: disk_to_disk(*args),
              "floor": lambda: io_floor(*args),
              "in-memory": lambda: in_memory(*args),
              "compare": lambda: compare(*args),
              "layerwise": lambda: layerwise(args[0], args[1], paths[-2], paths[-1]),
              "layerwise-in-memory": lambda: layerwise_in_memory(args[0], args[1], paths[-1])}[task]()
    print(json.dumps(result))


# --- the run -----------------------------------------------------------------------------------------
def _run(task: str, model: str, *paths: Path, timeout: float = 7200, mem_gb: float = 20) -> dict:
    result = run_worker(Path(__file__), [task, model, *map(str, paths)], timeout, mem_gb, threads=THREADS)
    print(f"{model} {task}: {json.dumps(result)[:300]}", flush=True)
    return result


def measure(model: str, cache: Path, only: str = "", layers: int = 0, calib: str = "8x128",
            device: str = "cpu") -> dict:
    if only == "layerwise":
        return measure_layerwise(model, cache, layers, calib, device)
    src, out = cache / model, cache / f"{model}-work"
    if only == "structure":  # the structure needs config.json alone
        _config(model).save_pretrained(src)
        threads = "" if THREADS == 2 else f", {THREADS} thread{'s' * (THREADS > 1)}"
        return {f"structure once{threads}": _run("structure-once", model, src),
                f"structure each{threads}": _run("structure-each", model, src)}
    if only == "equality":  # disk to disk and in memory, compared
        if not (src / "model.safetensors.index.json").is_file():
            _run("write", model, src)
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
        rows = {"disk to disk": _run("disk-to-disk", model, src, out / "pruned"),
                "in memory": _run("in-memory", model, src, out / "memory")}
        rows["in memory"].update(_run("compare", model, out / "memory", out / "pruned"))
        shutil.rmtree(out, ignore_errors=True)
        return rows
    if not (src / "model.safetensors.index.json").is_file():
        _run("write", model, src)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    rows = {"structure once": _run("structure-once", model, src),
            "structure each": _run("structure-each", model, src)}
    rows["disk to disk"] = _run("disk-to-disk", model, src, out / "pruned")
    rows["I/O floor"] = _run("floor", model, src, out / "pruned", out / "floor")
    shutil.rmtree(out / "floor", ignore_errors=True)
    if model == "1b":
        rows["in memory"] = _run("in-memory", model, src, out / "memory")
        rows["in memory"].update(_run("compare", model, out / "memory", out / "pruned"))
    shutil.rmtree(out, ignore_errors=True)
    return rows


def measure_layerwise(model: str, cache: Path, layers: int, calib: str, device: str) -> dict:
    """flap + reconstruct from disk and in memory (bf16), compared."""
    name = f"{model}-{layers}l" if layers else model
    src, out = cache / name, cache / f"{name}-work"
    if not (src / "model.safetensors.index.json").is_file():
        _run("write", name, src)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    label = f"flap+reconstruct {calib}" + (f" {device}" if device != "cpu" else "")
    rows = {f"layer by layer, {label}": _run("layerwise", name, src, out / "pruned", calib, device)}
    if device == "cpu":
        memory = _run("layerwise-in-memory", name, src, out / "memory", calib)
        memory.update(_run("compare", name, out / "memory", out / "pruned"))
        rows[f"in memory, {label}"] = memory
    shutil.rmtree(out, ignore_errors=True)
    return {f"{name}:{k}": v for k, v in rows.items()}


def render(results: dict) -> str:
    rows = []
    for model, variants in results.get("rows", {}).items():
        floor = variants.get("I/O floor", {}).get("wall_s")
        for name, r in variants.items():
            if "wall_s" not in r or "status" in r:
                rows.append((model, name, r.get("status", "?"), "", "", "", "", "", ""))
                continue
            ratio = f"{r['wall_s'] / floor:.2f}" if floor and name in ("disk to disk", "in memory") else ""
            moved = (f"{r['bytes_read'] / 1e9:.2f}" if "bytes_read" in r else "",
                     f"{r['bytes_written'] / 1e9:.2f}" if "bytes_written" in r else "")
            note = (f"equal to disk to disk: {r['equal']}" + (f" (max abs diff {r['max_abs_diff']:.2g})"
                                                             if "max_abs_diff" in r else "")) if "equal" in r else \
                (f"{r['groups']} groups; export + analysis {r['analyse_s']:.1f} s wall"
                 + (f", {r['analyse_cpu_s']:.1f} s CPU" if "analyse_cpu_s" in r else "") if "analyse_s" in r else "")
            cpu = f"{r['cpu_s']:.1f}" if "cpu_s" in r else ""
            rows.append((model, name, f"{r['wall_s']:.1f}", cpu, ratio, f"{r['peak_gb']:.2f}", *moved, note))
    header = ("model", "run", "wall s", "CPU s", "x floor (wall)", "peak RSS GiB", "GB read", "GB written", "")
    return f"# {SECTION}\n\n{json.dumps(results.get('meta', {}))}\n\n" + table(header, rows) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    models = list(results.get("rows", {}))
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    runs = ("structure each", "structure once", "disk to disk", "I/O floor", "in memory")
    for ax, field, label in ((axes[0], "wall_s", "wall time (s)"), (axes[1], "peak_gb", "peak RSS (GiB)")):
        width = 0.8 / len(runs)
        for i, run in enumerate(runs):
            values = [results["rows"][m].get(run, {}).get(field, 0) or 0 for m in models]
            ax.bar([j + i * width for j in range(len(models))], values, width, label=run)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(models))], [f"{m}-shaped" for m in models])
        ax.set_ylabel(label)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"fxprune.hf.prune_checkpoint, {SPARSITY:.0%} width, {CRITERION}, bf16, {THREADS} threads")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    global THREADS
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "fxprune-bench-out-of-core")
    parser.add_argument("--keep", action="store_true", help="keep the written checkpoints for a rerun")
    parser.add_argument("--only", choices=("structure", "equality", "layerwise"), default="",
                        help="only the structure rows (config.json alone: no checkpoint written), only "
                             "disk to disk and in memory, compared, or only flap+reconstruct layer by layer "
                             "against in memory")
    parser.add_argument("--layers", type=int, default=0, help="--only layerwise: cut the depth to this many layers")
    parser.add_argument("--calib", default="8x128", help="--only layerwise: calibration windows, COUNTxLENGTH")
    parser.add_argument("--device", default="cpu", help="--only layerwise: where the layers run (cuda on a GPU)")
    parser.add_argument("--threads", type=int, default=THREADS,
                        help="torch threads of each run (a loaded host: 1 keeps the analysis's small ops from "
                             "spinning; --only structure names its rows by it)")
    parser.add_argument("--table-only", action="store_true")
    args = parser.parse_args()
    THREADS = args.threads
    if not args.table_only:
        meta = environment(THREADS)
        for model in args.models:
            previous = load_results().get(SECTION, {}).get("rows", {}).get(model, {})
            rows = measure(model, args.cache, args.only, args.layers, args.calib, args.device)
            save_section(SECTION, meta, {model: {**previous, **rows}})
        if not args.keep:
            shutil.rmtree(args.cache, ignore_errors=True)
    results = load_results().get(SECTION, {})
    (HERE / f"{SECTION}.md").write_text(render(results), encoding="utf-8")
    plot(results, HERE / f"{SECTION}.png")


if __name__ == "__main__":
    main()
