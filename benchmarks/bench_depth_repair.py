"""The depth repair's fits compared on SmolLM2-135M-Instruct: held-out perplexity of the pruned graph.

For each calibration size (``--calibration 4 16 32`` sequences of 128 tokens from the start of
``pydoc_data.topics``) and each layer ratio (10%, 25%), the layers are chosen once by ``--criterion``
on that calibration data, removed from the exported graph, and each repair fit of
:data:`fxprune.data.block_criteria.REPAIR_FITS` at each ridge is applied to a fresh copy; the moments of
each removed run are gathered once and shared by the fits. Perplexity is measured on the graph (the HF
rebuild is the same tensors: ``bench_depth.py`` checks that route) on ``--eval`` held-out sequences from
the end of the text, the same as ``bench_depth.py``'s.

    nice -n 10 python benchmarks/bench_depth_repair.py --calibration 4 16 32
    nice -n 10 python benchmarks/bench_depth_repair.py --calibration 4 --choices bench_depth_sleb2.json:sleb10

``--walks run sequential sequential-all`` says which linears the repair refits
(:data:`fxprune.data.block_criteria.REPAIR_WALKS`; a sequential walk runs the calibration data through
the pruned graph once per fit and ridge); the rows of the sequential walks are in
``bench_depth_repair_seq.json``:

    nice -n 10 python benchmarks/bench_depth_repair.py --calibration 4 16 --walks sequential sequential-all \
        --fits toward-original=1 --no-none --out benchmarks/bench_depth_repair_seq.json

``--choices FILE:ROW`` takes the removed layers from a ``bench_depth.py`` json row instead of choosing
them (SLEB's choice costs minutes; the row says which layers it removed).

Writes ``bench_depth_repair.json`` (one row per setting, appended as measured).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from bench_depth import batches, load_smollm2, text_ids  # noqa: E402
from fxprune.core.blocks import consecutive_runs, drop_blocks  # noqa: E402
from fxprune.core.capture import capture, export, without_cache  # noqa: E402
from fxprune.data import block_criteria as bc  # noqa: E402
from fxprune.hf.depth import _causal_lm_loss, _layer_blocks, layer_list  # noqa: E402

RIDGES = {"refit": (1e-3, 1e-2, 1e-1), "toward-original": (1e-2, 1e-1, 1.0), "output-map": (1e-2, 1e-1, 1.0),
          "scale": (1e-2, 1.0)}


def perplexity(gm, data) -> float:
    losses, tokens = 0.0, 0
    with torch.no_grad():
        for x in data:
            out = gm(x)
            logits = out.logits if hasattr(out, "logits") else out[0]
            losses += float(F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), x[:, 1:].flatten(), reduction="sum"))
            tokens += x[:, 1:].numel()
    return float(torch.tensor(losses / tokens).exp())


def moments(gm, found, chosen, calibration) -> list:
    """Per removed run: (writer keys, Gram, cross, yy, old weight), gathered once."""
    out = []
    for run in consecutive_runs(found, chosen):
        writer, _ = bc._writer(gm, found, run)
        if writer is None:
            continue
        node, weight_key, bias_key = writer
        gram, cross, yy = bc._moments(gm, node, run, calibration, bias_key is not None)
        out.append((weight_key, bias_key, gram, cross, yy, bc._weight_matrix(gm, weight_key, bias_key)))
    return out


def repaired(gm, chosen, runs, fit: str, ridge: float):
    pruned = drop_blocks(gm, chosen)
    errors = []
    for weight_key, bias_key, gram, cross, yy, old in runs:
        new = bc.REPAIR_FITS[fit](gram, cross, old, ridge)
        errors.append([bc.relative_error(w, gram, cross, yy) for w in (old, new)])
        bc._write(pruned, weight_key, bias_key, new)
    return pruned, errors


def walked(gm, found, chosen, calibration, runs, walk: str, fit: str, ridge: float):
    """The pruned graph repaired by ``walk`` (``none``: not repaired) and each refit's errors."""
    if walk == "none":
        return drop_blocks(gm, chosen), []
    if walk == "run":
        return repaired(gm, chosen, runs, fit, ridge)
    pruned = drop_blocks(gm, chosen)
    done = bc.repair(gm, pruned, found, chosen, calibration, ridge, fit, walk)
    return pruned, [[r.error_before, r.error_after] for r in done]


def choices(args, gm, found, calibration, path: str, total: int):
    """``(ratio, criterion, block names)``: chosen by ``--criterion`` per ratio, or read from json rows."""
    for spec in args.choices:
        file, row = spec.rsplit(":", 1)
        [record] = [r for r in json.loads((HERE / file).read_text()) if r["row"] == row]
        depth = record["details"]["depth"]
        yield len(depth["dropped"]) / total, f"{depth['criterion']} ({spec})", [f"{path}.{i}" for i in depth["dropped"]]
    for ratio in ([] if args.choices else args.ratios):
        names, _ = bc.choose_blocks(gm, found, calibration, round(ratio * total), args.criterion, _causal_lm_loss)
        yield ratio, args.criterion, names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calibration", type=int, nargs="+", default=[4, 16, 32])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.1, 0.25])
    parser.add_argument("--criterion", default="block-influence")
    parser.add_argument("--eval", type=int, default=4)
    parser.add_argument("--choices", nargs="*", default=[], metavar="FILE:ROW",
                        help="removed layers from a bench_depth json row instead of --ratios")
    parser.add_argument("--fits", nargs="*", default=[], metavar="FIT=R,R",
                        help="the fits and ridges to try (default: RIDGES)")
    parser.add_argument("--walks", nargs="*", default=["run"], choices=tuple(bc.REPAIR_WALKS),
                        help="which linears the repair refits (a sequential walk is run per fit and ridge)")
    parser.add_argument("--no-none", action="store_true", help="skip the unrepaired row")
    parser.add_argument("--out", type=Path, default=HERE / "bench_depth_repair.json")
    args = parser.parse_args()
    grid = {f: tuple(float(r) for r in rs.split(",")) for f, rs in (a.split("=") for a in args.fits)} or RIDGES
    tokenizer, model = load_smollm2()
    ids = text_ids(tokenizer)
    evaluation = batches(ids, args.eval, 128, 4, from_end=True)
    path, total = layer_list(model)
    gm = capture(export(without_cache(model), (evaluation[0],), None), (evaluation[0],)).gm
    found = _layer_blocks(model, gm, path, total)
    dense = perplexity(gm, evaluation)
    rows = json.loads(args.out.read_text()) if args.out.exists() else []
    for count in args.calibration:
        calibration = batches(ids, count, 128, 4, from_end=False)
        for ratio, criterion, names in choices(args, gm, found, calibration, path, total):
            start = time.time()
            chosen = found.pick(names)
            runs = moments(gm, found, chosen, calibration) if "run" in args.walks else []
            base = dict(calibration=count, ratio=ratio, criterion=criterion, dense=dense,
                        dropped=sorted(int(n.rsplit(".", 1)[1]) for n in names))
            settings = [] if args.no_none else [("none", "none", 0.0)]
            settings += [(walk, fit, r) for walk in args.walks for fit, ridges in grid.items() for r in ridges]
            for walk, fit, ridge in settings:
                start = time.time()
                pruned, errors = walked(gm, found, chosen, calibration, runs, walk, fit, ridge)
                ppl = perplexity(pruned, evaluation)
                row = dict(base, walk=walk, fit=fit, ridge=ridge, perplexity=ppl, x_dense=ppl / dense,
                           fit_errors=errors, seconds=time.time() - start)
                print(json.dumps(row), flush=True)
                rows.append(row)
                args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
