"""Detectors and YOLO, pruned through their traceable parts, the model's own class back (fxprune.module).

For each model and ratio (30%, 50%): parameters and MACs before and after, eager latency of the returned
module at batch 1 and 8 (median of 3 after a warm-up, one thread), prune wall time and the worker's peak
memory (``ru_maxrss``); Torch-Pruning 1.6.1 on the same model beside it (``BasePruner``, L1 group
magnitude, the detection outputs ignored, as its YOLO example does), its failures kept as rows. Every
run is a fresh subprocess (``common.run_worker``) with a timeout and a memory cap; random weights, images
of 320x320. Writes ``bench_detection.md`` and the ``bench_detection`` section of ``results.json``.

    nice -n 10 python benchmarks/bench_detection.py            # all rows
    nice -n 10 python benchmarks/bench_detection.py --models yolov8n --ratios 0.5
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import environment, run_worker, save_section, table  # noqa: E402

MODELS = ["fasterrcnn_mobilenet_v3_large_fpn", "retinanet_resnet50_fpn", "ssdlite320_mobilenet_v3_large",
          "yolov8n", "yolo11n"]
RATIOS = [0.3, 0.5]
TOOLS = ["fxprune", "torch-pruning"]
SIZE = 320


def build(name: str):
    """The model (random weights, eval) and a function from a batch size to its inputs."""
    import torch
    import torchvision
    torch.manual_seed(0)
    if name.startswith("yolo"):
        from ultralytics.nn.tasks import DetectionModel  # AGPL-3.0: benchmarks and tests only
        return DetectionModel(f"{name}.yaml", verbose=False).eval(), lambda n: (torch.rand(n, 3, SIZE, SIZE),)
    options = {"weights": None, "weights_backbone": None, "num_classes": 91}
    if not name.startswith("ssd"):
        options.update(min_size=SIZE, max_size=SIZE)
    model = getattr(torchvision.models.detection, name)(**options).eval()
    return model, lambda n: ([torch.rand(3, SIZE, SIZE) for _ in range(n)],)


def outputs_to_ignore(model) -> list:
    """The layers that produce a detector's outputs (class scores, boxes): fixed for both tools."""
    from torch import nn
    names = ("cls_logits", "bbox_pred", "bbox_reg", "cls_score", "cls_logits", "bbox_ctrness", "dfl")
    out = [m for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in names]
    out += [m for n, m in model.named_modules() if type(m).__name__ in ("Detect", "SSDLiteClassificationHead",
                                                                          "SSDLiteRegressionHead")]
    return [m for m in out if isinstance(m, nn.Module)]


def prune(tool: str, model, inputs: tuple, ratio: float):
    if tool == "fxprune":
        import fxprune.module
        return fxprune.module.prune_parts(model, inputs, sparsity=ratio).module
    import torch_pruning as tp
    imp = tp.importance.GroupMagnitudeImportance(p=1)
    pruner = tp.pruner.BasePruner(model, inputs, importance=imp, pruning_ratio=ratio,
                                  ignored_layers=outputs_to_ignore(model))
    pruner.step()
    return model


def fails(model, inputs: tuple) -> str:
    """The error of one plain forward of ``model`` ('' when it runs). A peer's model is run as is, not
    through fxprune's input checks (count_macs would report its failure as fxprune's ExampleInputError)."""
    import torch
    try:
        with torch.no_grad():
            model(*inputs)
    except Exception as exc:
        return f"{type(exc).__name__}: {str(exc)[-200:]}"
    return ""


def latency(model, inputs: tuple) -> float:
    import torch
    with torch.no_grad():
        model(*inputs)
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            model(*inputs)
            times.append(time.perf_counter() - t0)
    return sorted(times)[1] * 1000


def worker(name: str, tool: str, ratio: float) -> dict:
    import torch
    from fxprune.measure import count_macs, count_params
    torch.set_num_threads(1)
    model, make = build(name)
    row = {"params_before": count_params(model), "macs_before": count_macs(model, make(1))}
    t0 = time.perf_counter()
    pruned = prune(tool, model, make(1), ratio)
    row["prune_s"] = round(time.perf_counter() - t0, 1)
    row["peak_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    failure = fails(pruned, make(1))
    if failure:  # the pruned model does not run: a row of its own, with the model's own error
        return {**row, "status": "broken", "stderr_tail": f"pruned model fails: {failure}"}
    macs = count_macs(pruned, make(1))
    row.update(params_after=count_params(pruned), macs_after=macs, same_class=type(pruned) is type(build(name)[0]),
               ms_b1=round(latency(pruned, make(1)), 1), ms_b8=round(latency(pruned, make(8)), 1))
    row["ms_b1_before"] = round(latency(build(name)[0], make(1)), 1)
    return row


def render(rows: dict) -> str:
    header = ["model", "tool", "ratio", "params", "MACs (G)", "ms b1", "ms b8", "prune s", "peak MB", "status"]
    body = []
    for key in sorted(rows):
        name, tool, ratio = key.split("|")
        r = rows[key]
        if r.get("status", "ok") != "ok":
            reason = (r.get("stderr_tail", "") or "").strip().splitlines()[-1:] or [r["status"]]
            body.append([name, tool, ratio, "—", "—", "—", "—", r.get("wall_s"), "—", f"{r['status']}: "
                         f"{reason[0][:90]}"])
            continue
        body.append([name, tool, ratio, f"{r['params_before'] / 1e6:.2f}M → {r['params_after'] / 1e6:.2f}M",
                     f"{r['macs_before'] / 1e9:.2f} → {r['macs_after'] / 1e9:.2f}",
                     f"{r['ms_b1_before']} → {r['ms_b1']}", r["ms_b8"], r["prune_s"], r["peak_mb"],
                     "ok" + ("" if r["same_class"] else " (other class)")])
    return table(header, body)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", nargs=3, metavar=("MODEL", "TOOL", "RATIO"))
    parser.add_argument("--models", nargs="*", default=MODELS)
    parser.add_argument("--ratios", nargs="*", type=float, default=RATIOS)
    parser.add_argument("--tools", nargs="*", default=TOOLS)
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--render", action="store_true", help="only rewrite bench_detection.md from results.json")
    args = parser.parse_args()
    if args.render:
        from common import load_results
        write(load_results()["bench_detection"]["rows"])
        return
    if args.worker:
        name, tool, ratio = args.worker
        print(json.dumps({"status": "ok", **worker(name, tool, float(ratio))}))  # "broken" overrides "ok"
        return
    rows = {}
    for name in args.models:
        for ratio in args.ratios:
            for tool in args.tools:
                key = f"{name}|{tool}|{ratio}"
                rows[key] = run_worker(Path(__file__), [name, tool, str(ratio)], args.timeout, mem_gb=16)
                print(key, json.dumps(rows[key])[:300], flush=True)
                section = save_section("bench_detection", environment(1), rows)
    write(section["rows"])


def write(rows: dict) -> None:
    text = "# bench_detection\n\nWritten by `benchmarks/bench_detection.py` (random weights, 320x320 images, " \
           "one thread; latency of the eager module, before → after at batch 1).\n\n" + render(rows)
    (HERE / "bench_detection.md").write_text(text + "\n", encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
