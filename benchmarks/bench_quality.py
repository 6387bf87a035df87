"""Quality after pruning: every fxprune criterion and recovery pass against Torch-Pruning, on real
trained models (``quality_models.py``), side by side in one run.

- **vision**: the residual BatchNorm CNN trained on scikit-learn's digits, 30% and 50% channel sparsity
  (uniform per group; the classifier's outputs kept), 512 calibration images (4 batches of 128, from
  the training split). fx level.
- **language**: the small LLaMA trained on Python's documentation text, 20% and 50% of the MLP and
  attention width (every prunable group: MLP units, v/o head dims, q/k rotary pairs; the residual
  stream is frozen by RMSNorm), byte perplexity on the held-out tail, 64 calibration windows (4
  batches of 16). Export level (HuggingFace models prune at the export level).

For each criterion the metric right after pruning, after each recovery step (on the same pruned
model), and after one epoch of fine-tuning (from the best one-shot column; language: one epoch over a
fixed 512-window subset of the training split, 32 steps, so the run stays within minutes).
Torch-Pruning (its ``MetaPruner`` with each importance, same ratio, same calibration batches for Taylor
and Hessian) is measured beside it, with fxprune's ``recalibrate-batchnorm`` pass applied to its result
too. The cost row runs in a fresh process: wall time and peak-RSS growth of calibration + recovery on
the vision model, beside the bound "largest Gram matrix + one batch of activations".

    python benchmarks/bench_quality.py                 # both parts, writes bench_quality.{json,md}
    python benchmarks/bench_quality.py --only vision   # one part (merged into the JSON)
    python benchmarks/bench_quality.py --table-only    # rebuild the Markdown from the JSON

One thread (``torch.set_num_threads(1)``); other work may run beside it (load is recorded).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import resource
import sys
import time
import traceback
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import run_worker  # noqa: E402
from quality_models import logits_of, trained_digits_cnn, trained_llama  # noqa: E402

import fxprune  # noqa: E402
from fxprune.core.capture import capture  # noqa: E402
from fxprune.data.criteria import CRITERIA  # noqa: E402
from fxprune.data.recovery import recover  # noqa: E402

JSON = HERE / "bench_quality.json"
MD = HERE / "bench_quality.md"
VISION_RATIOS = (0.3, 0.5)
LANGUAGE_RATIOS = (0.2, 0.5)
GRADIENT = ("taylor", "hessian")
#: one-shot columns: (name, recovery steps run on the pruned model)
VISION_STEPS = (("pruned", ()), ("+bias", ("compensate-bias",)), ("+batchnorm", ("recalibrate-batchnorm",)),
                ("+reconstruct", ("reconstruct",)), ("+reconstruct+batchnorm", ("reconstruct", "recalibrate-batchnorm")))
LANGUAGE_STEPS = (("pruned", ()), ("+bias", ("compensate-bias",)), ("+reconstruct", ("reconstruct",)))
TP_IMPORTANCES = ("GroupMagnitude", "Taylor", "Hessian", "LAMP", "FPGM", "BNScale")
FINETUNE_LR = 3e-4
#: language rows that are also fine-tuned (each costs ~50 s on one thread)
LANGUAGE_FINETUNED = ("l1", "group_magnitude", "wanda", "flap")


def _load() -> float:
    return round(os.getloadavg()[0], 1)


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, round(time.perf_counter() - t0, 2)


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _row_error(row: dict, exc: BaseException) -> dict:
    row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
    traceback.print_exc(file=sys.stderr)
    return row


# --- fxprune ----------------------------------------------------------------------------------------
def fxprune_row(task: Any, ratio: float, criterion: str, level: str, loader: list, loss_fn: Callable,
                steps: tuple, sparsity: Any, finetune: Callable) -> dict:
    """One criterion: prune once, then each recovery column on that same pruned model, then fine-tune
    the best one-shot result."""
    row: dict[str, Any] = {"library": "fxprune", "criterion": criterion, "ratio": ratio}
    data = {"calibration": loader} if criterion not in ("l1", "l2", "fpgm", "bn_scale", "random",
                                                         "group_magnitude") else {}
    if criterion in GRADIENT:
        data["loss_fn"] = loss_fn
    try:
        result, row["prune_s"] = _timed(lambda: fxprune.prune(task.model, task.example_inputs, sparsity=sparsity,
                                                              criterion=criterion, capture=level, **data))
        row["params"] = _params(result.graph_module)
        best, best_metric = None, None
        for name, chain in steps:
            if chain:
                (gm, _), row[f"{name}_s"] = _timed(lambda: recover(result.analysis, result.drop,
                                                                   result.graph_module, loader, chain))
            else:
                gm = result.graph_module
            row[name] = task.evaluate(gm)
            if best is None or _better(task.metric, row[name], best_metric):
                best, best_metric, row["best"] = gm, row[name], name
        if finetune is not None:
            row["finetuned"] = task.evaluate(finetune(copy.deepcopy(best)))
    except Exception as exc:  # recorded in the table, never hidden
        return _row_error(row, exc)
    return row


def _better(metric: str, a: float, b: float) -> bool:
    return a > b if metric == "accuracy" else a < b


# --- Torch-Pruning ------------------------------------------------------------------------------------
def _tp_importance(name: str) -> Any:
    import torch_pruning as tp
    return {"GroupMagnitude": lambda: tp.importance.GroupMagnitudeImportance(p=2),
            "Taylor": lambda: tp.importance.GroupTaylorImportance(),
            "Hessian": lambda: tp.importance.GroupHessianImportance(),
            "LAMP": lambda: tp.importance.LAMPImportance(p=2),
            "FPGM": lambda: tp.importance.FPGMImportance(p=2),
            "BNScale": lambda: tp.importance.BNScaleImportance()}[name]()


def _tp_gradients(model: nn.Module, imp: Any, name: str, loader: list, loss_fn: Callable) -> None:
    """Taylor: gradients summed over the calibration batches; Hessian: per-sample gradients
    accumulated (Torch-Pruning's own recipe)."""
    model.zero_grad()
    for x, y in loader:
        if name == "Taylor":
            loss_fn(model(x), y).backward()
            continue
        for i in range(len(x)):
            loss_fn(model(x[i:i + 1]), y[i:i + 1]).backward()
            imp.accumulate_grad(model)
            model.zero_grad(set_to_none=False)  # Hessian's scoring writes into every .grad


def tp_row(task: Any, ratio: float, name: str, loader: list, loss_fn: Callable, ignored: Callable,
           finetune: Callable, recalibrate: bool) -> dict:
    import torch_pruning as tp
    row: dict[str, Any] = {"library": "Torch-Pruning", "criterion": name, "ratio": ratio}
    try:
        model = copy.deepcopy(task.model)
        imp = _tp_importance(name)

        def step() -> None:
            pruner = tp.pruner.MetaPruner(model, task.example_inputs[0], importance=imp, pruning_ratio=ratio,
                                          ignored_layers=ignored(model))
            if name in ("Taylor", "Hessian"):
                _tp_gradients(model, imp, name, loader, loss_fn)
            pruner.step()
            model.zero_grad(set_to_none=False)
            model.eval()

        _, row["prune_s"] = _timed(step)
        row["params"] = _params(model)
        row["pruned"], best, row["best"] = task.evaluate(model), model, "pruned"
        if recalibrate:
            from fxprune.passes import RecalibrateBatchNorm
            gm = capture(model, task.example_inputs).gm
            gm = RecalibrateBatchNorm().with_calibration(loader)(gm).graph_module
            row["+batchnorm"] = task.evaluate(gm)
            if _better(task.metric, row["+batchnorm"], row["pruned"]):
                best, row["best"] = gm, "+batchnorm"
        row["finetuned"] = task.evaluate(finetune(copy.deepcopy(best)))
    except Exception as exc:
        return _row_error(row, exc)
    return row


# --- the two parts ------------------------------------------------------------------------------------
def vision(save: Callable[[dict], None], previous: Optional[dict] = None) -> dict:
    task = trained_digits_cnn()
    images, labels = task.calibration
    loader = [(images[i:i + 128], labels[i:i + 128]) for i in range(0, 512, 128)]
    task = _with_example(task, (images[:128],))
    finetune = lambda m: task.finetune(m, lr=FINETUNE_LR)  # noqa: E731
    part = {"model": "digits_cnn", "metric": "accuracy", "dense": task.evaluate(task.model),
            "params": _params(task.model), "rows": _kept_rows(previous), "load": _kept_load(previous)}
    for ratio in VISION_RATIOS:
        for criterion in _selected(CRITERIA):
            _add(part, save, fxprune_row(task, ratio, criterion, "fx", loader, F.cross_entropy, VISION_STEPS,
                                         ratio, finetune))
        for name in _selected(TP_IMPORTANCES) if _selected(("torch-pruning",)) else ():
            _add(part, save, tp_row(task, ratio, name, loader, F.cross_entropy, lambda m: [m.fc], finetune, True))
    return part


def _add(part: dict, save: Callable[[dict], None], row: dict) -> None:
    """Add (or replace, when ``--criteria`` reruns it) a row and save at once: a long run that is cut
    keeps what it measured."""
    key = (row["library"], row["criterion"], row["ratio"])
    same = [i for i, r in enumerate(part["rows"]) if (r["library"], r["criterion"], r["ratio"]) == key]
    if same:
        part["rows"][same[0]] = row
    else:
        part["rows"].append(row)
    part["load"] = max(part["load"], _load())
    print(json.dumps(row), flush=True)
    save(part)


def _lm_loss(output: Any, target: torch.Tensor) -> torch.Tensor:
    logits = logits_of(output)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))


def language(save: Callable[[dict], None], previous: Optional[dict] = None) -> dict:
    task = trained_llama()
    windows = task.calibration[0]
    loader = [(windows[i:i + 16, :-1], windows[i:i + 16, 1:]) for i in range(0, len(windows), 16)]
    finetune = lambda m: task.finetune(m, lr=FINETUNE_LR, windows=512)  # noqa: E731
    part = {"model": "llama", "metric": "perplexity", "dense": task.evaluate(task.model),
            "params": _params(task.model), "rows": _kept_rows(previous), "load": _kept_load(previous)}
    # captured once, with a dynamic batch dim (hessian runs one sample at a time); each prune starts from it
    batch = ({0: torch.export.Dim("batch")},)
    captured = replace(task, model=capture(task.model, task.example_inputs, "export", dynamic_shapes=batch).gm)
    for ratio in LANGUAGE_RATIOS:
        for criterion in _selected(CRITERIA):
            _add(part, save, fxprune_row(captured, ratio, criterion, "export", loader, _lm_loss, LANGUAGE_STEPS,
                                         ratio, finetune if criterion in LANGUAGE_FINETUNED else None))
        if _selected(("torch-pruning",)):
            _add(part, save, tp_llama_row(task, ratio, loader, finetune))
    return part


SELECTED: Optional[set] = None
"""``--criteria``: the rows to (re)measure; None: all."""


def _kept_rows(previous: Optional[dict]) -> list:
    """With ``--criteria``, the saved rows stay (the rerun ones are replaced as they come)."""
    return list(previous["rows"]) if SELECTED is not None and previous else []


def _kept_load(previous: Optional[dict]) -> float:
    """The highest load seen over every run whose rows the part holds."""
    return max(_load(), previous["load"]) if SELECTED is not None and previous else _load()


def _selected(names: tuple) -> tuple:
    return tuple(n for n in names if SELECTED is None or n in SELECTED)


def tp_llama_row(task: Any, ratio: float, loader: list, finetune: Callable) -> dict:
    """Torch-Pruning's magnitude pruning of the same widths: MLP units and whole heads; the residual
    stream (embedding, norms, lm_head) left whole, as fxprune's RMSNorm rule leaves it."""
    import torch_pruning as tp
    row: dict[str, Any] = {"library": "Torch-Pruning", "criterion": "GroupMagnitude", "ratio": ratio}
    try:
        model = copy.deepcopy(task.model)
        cfg = model.config
        num_heads = {layer.self_attn.q_proj: cfg.num_attention_heads for layer in model.model.layers}
        num_heads.update({layer.self_attn.k_proj: cfg.num_key_value_heads for layer in model.model.layers})
        num_heads.update({layer.self_attn.v_proj: cfg.num_key_value_heads for layer in model.model.layers})
        ignored = [model.lm_head, model.model.embed_tokens]

        def step() -> None:
            pruner = tp.pruner.MetaPruner(model, task.example_inputs[0], importance=tp.importance.GroupMagnitudeImportance(p=2),
                                          pruning_ratio=ratio, ignored_layers=ignored, num_heads=num_heads,
                                          prune_num_heads=True, prune_head_dims=False, head_pruning_ratio=ratio,
                                          output_transform=lambda out: logits_of(out))
            pruner.step()
            for layer in model.model.layers:  # Torch-Pruning's LLaMA recipe: the attention reads its sizes
                attn = layer.self_attn
                attn.num_heads = attn.q_proj.weight.shape[0] // attn.head_dim
                attn.num_key_value_heads = attn.k_proj.weight.shape[0] // attn.head_dim
                attn.num_key_value_groups = attn.num_heads // attn.num_key_value_heads
            model.config.num_attention_heads = model.model.layers[0].self_attn.num_heads
            model.config.num_key_value_heads = model.model.layers[0].self_attn.num_key_value_heads

        _, row["prune_s"] = _timed(step)
        row["params"] = _params(model)
        row["pruned"], row["best"] = task.evaluate(model), "pruned"
        row["finetuned"] = task.evaluate(finetune(copy.deepcopy(model)))
    except Exception as exc:
        return _row_error(row, exc)
    return row


def _with_example(task: Any, example: tuple) -> Any:
    return replace(task, example_inputs=example)


# --- cost ---------------------------------------------------------------------------------------------
def cost_worker() -> dict:
    """Fresh process: the digits CNN at 50% (l1), then time and peak-RSS growth of calibration +
    recovery (reconstruct, recalibrate-batchnorm) on 512 images."""
    task = trained_digits_cnn()
    images, labels = task.calibration
    loader = [(images[i:i + 128], labels[i:i + 128]) for i in range(0, 512, 128)]
    result = fxprune.prune(task.model, (images[:128],), sparsity=0.5)
    for _ in range(2):  # warm-up: interpreters, allocator
        recover(result.analysis, result.drop, result.graph_module, loader[:1], ("recalibrate-batchnorm",))
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    (gm, reports), seconds = _timed(lambda: recover(result.analysis, result.drop, result.graph_module, loader,
                                                    ("reconstruct", "recalibrate-batchnorm")))
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    gram = max(_gram_bytes(result, f) for f in result.analysis.weighted_consumers)
    batch = sum(n.meta["val"].numel() * n.meta["val"].element_size() for n in result.analysis.gm.graph.nodes
                if isinstance(n.meta.get("val"), torch.Tensor))  # traced on the example: one batch of 128
    return {"seconds": seconds, "rss_growth_mb": round(grown, 1), "largest_gram_mb": round(gram / 2**20, 2),
            "batch_activations_mb": round(batch / 2**20, 1), "accuracy": task.evaluate(gm), "load": _load()}


def _gram_bytes(result: Any, f: Any) -> int:
    w = result.analysis.tensor(f.weight)
    features = math.prod(w.shape[1:]) + 1
    return features * (features + w.shape[0]) * 8  # Gram + cross moments, float64


# --- the table ----------------------------------------------------------------------------------------
def _fmt(value: Any, metric: str) -> str:
    if not isinstance(value, (int, float)):
        return "—"
    return f"{100 * value:.1f}%" if metric == "accuracy" else f"{value:.2f}"


def part_table(part: dict) -> list[str]:
    metric = part["metric"]
    steps = [n for n, _ in (VISION_STEPS if part["model"] == "digits_cnn" else LANGUAGE_STEPS)]
    cols = steps + ["finetuned"]
    lines = [f"**{part['model']}** — dense {metric} {_fmt(part['dense'], metric)}, {part['params']:,} parameters "
             f"(load {part['load']} during the run)", "",
             "| ratio | library | criterion | params | " + " | ".join(cols) + " | prune s | recovery s |",
             "|---|---|---|---|" + "---|" * len(cols) + "---|---|"]
    for row in part["rows"]:
        if "error" in row:
            lines.append(f"| {row['ratio']} | {row['library']} | {row['criterion']} | error: {row['error']} |"
                         + " |" * (len(cols) + 2))
            continue
        rec = max((row[f"{n}_s"] for n in steps if f"{n}_s" in row), default=None)
        values = [_fmt(row.get(c), metric) for c in cols]
        lines.append(f"| {row['ratio']} | {row['library']} | {row['criterion']} | {row['params']:,} | "
                     + " | ".join(values) + f" | {row.get('prune_s', '—')} | {rec if rec is not None else '—'} |")
    return lines


def markdown(data: dict) -> str:
    out = ["# Quality after pruning: fxprune criteria and recovery vs Torch-Pruning", "",
           "Generated by `python benchmarks/bench_quality.py` (one thread; other work ran beside it, load "
           "given per part). Accuracy: digits test split (500 images); perplexity: byte-level, held-out "
           "10% of `pydoc_data.topics`. Columns: the metric right after pruning, after each recovery "
           "step on that same pruned model, and after fine-tuning the best one-shot column "
           "(vision: one epoch of the training split; language: one epoch over 512 training windows). "
           "`recovery s`: the slowest recovery column (calibration included).", ""]
    for key in ("vision", "language"):
        if key in data:
            out += part_table(data[key]) + [""]
    out += ["Notes: Torch-Pruning rounds each layer's pruned count differently, so at 30% its digits model is "
            "smaller than fxprune's (see `params`); at 50% both have the same size. On the LLaMA it prunes whole "
            "heads (its LLaMA recipe: `prune_num_heads`), fxprune head dims and rotary pairs; the residual stream "
            "stays whole in both. The LLaMA graph is captured once at the export level with a dynamic batch dim "
            "(`hessian` runs one sample at a time); `bn_scale` has no BatchNorm to read there and falls back to "
            "the producers' `l1`. `--criteria NAME,...` reruns some rows and keeps the others.", ""]
    if "cost" in data:
        c = data["cost"]
        out += ["**Cost** (fresh process, digits CNN at 50%, 512 calibration images, reconstruct + "
                "recalibrate-batchnorm): "
                f"{c['seconds']} s; peak RSS grew {c['rss_growth_mb']} MB, against a bound of the largest Gram "
                f"matrix with its cross moments ({c['largest_gram_mb']} MB) plus one batch of activations "
                f"({c['batch_activations_mb']} MB); accuracy after {100 * c['accuracy']:.1f}% (load {c['load']}).", ""]
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", choices=("vision", "language", "cost"))
    parser.add_argument("--table-only", action="store_true")
    parser.add_argument("--worker", choices=("cost",))
    parser.add_argument("--criteria", help="comma-separated fxprune criteria (and 'torch-pruning') to rerun; "
                                           "their rows replace the saved ones")
    args = parser.parse_args()
    global SELECTED
    SELECTED = set(args.criteria.split(",")) if args.criteria else None
    torch.set_num_threads(1)
    if args.worker:
        print(json.dumps(cost_worker()))
        return
    data = json.loads(JSON.read_text()) if JSON.exists() else {}
    if not args.table_only:
        parts = (args.only,) if args.only else ("vision", "cost", "language")
        for part in parts:
            def save(value: dict, part: str = part) -> None:
                data[part] = value
                JSON.write_text(json.dumps(data, indent=1))
                MD.write_text(markdown(data))
            if part == "cost":
                save(run_worker(Path(__file__), ["cost"], timeout_s=900, mem_gb=8))
            else:
                save((vision if part == "vision" else language)(save, data.get(part)))
    MD.write_text(markdown(data))
    print(markdown(data))


if __name__ == "__main__":
    main()
