"""fxprune.hf on a trained LLaMA: quality of the HF-compatible plan vs the unconstrained plan vs
Torch-Pruning's LLM recipe, and the cost of the whole HF path.

The model is issue 6's small trained LLaMA (``benchmarks/quality_models.py``: ``trained_llama()``,
1.87 M parameters, 4 layers, 6 heads, byte-level, trained on Python's documentation; metric: byte-level
perplexity on the held-out tail). At each sparsity (20%, 50%), magnitude importance, no calibration, no
fine-tuning, every variant prunes a fresh copy in a **fresh subprocess** (1 thread); fxprune scores with
its default ``group_magnitude`` (the L2 norm over every member of a group, like Torch-Pruning's):

* ``fxprune.hf own``: :func:`fxprune.hf.prune_with_result` (HF-compatible policy, each layer keeps its
  own indices at the common count) -> a ``LlamaForCausalLM`` whose config holds the plan;
* ``fxprune.hf shared``: the same, with ``layer_indices="shared"`` (the same indices in every layer, from
  the layers' summed mean-normalised scores);
* ``fxprune unconstrained``: :func:`fxprune.prune` at the export level with the ordinary policy
  (rotary pairs and value dims inside heads, per-layer choice) -> an ATen graph no config can hold;
* ``fxprune.hf own/shared hidden kept``: ``sparsity={"intermediate_size": s, "num_attention_heads": s}``,
  one ratio per config field, the hidden size not named and so kept (what LLM recipes usually prune);
* ``torch-pruning``: Torch-Pruning's LLM example recipe (``examples/LLMs/prune_llm.py``): MetaPruner,
  ``GroupMagnitudeImportance(p=2)`` (1.6.1's name for the example's ``GroupNormImportance``), uniform
  ``pruning_ratio`` = ``head_pruning_ratio`` = sparsity,
  ``prune_num_heads=True``, ``prune_head_dims=False``, ``round_to=4``, ``lm_head`` ignored, then the
  config patched by hand as that example does. Like ``fxprune.hf`` with a plain sparsity, it also
  prunes the hidden size (through every RMSNorm);
* ``torch-pruning hidden kept``: the same with the embedding ignored too, so the hidden size stays and
  the widths pruned are the ones fxprune prunes (equal parameters).

Reported per variant: perplexity, parameters kept, wall time of the pruning call and its peak RSS over
the RSS before it (:func:`fxprune.measure.measure`; for fxprune.hf the whole path: export, analysis,
rewrite, rebuild from the config and the output check).

    python benchmarks/bench_hf.py               # writes benchmarks/bench_hf.md
    python benchmarks/bench_hf.py --table-only  # rebuild the table from results.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import environment, load_results, run_worker, save_section, table  # noqa: E402

SPARSITIES = (0.2, 0.5)
VARIANTS = ("fxprune.hf own", "fxprune.hf shared", "fxprune unconstrained", "torch-pruning",
            "fxprune.hf own hidden kept", "fxprune.hf shared hidden kept", "torch-pruning hidden kept")
SECTION = "bench_hf"


# --- one variant, in a worker process ------------------------------------------------------------------
def _prune(variant: str, model: Any, inputs: tuple, sparsity: float) -> Any:
    """The pruned model (something perplexity can call)."""
    import fxprune
    if variant.startswith("fxprune.hf"):
        import fxprune.hf
        indices = variant.split()[1]
        if variant.endswith("hidden kept"):  # one ratio per config field; hidden_size not named: kept
            sparsity = {"intermediate_size": sparsity, "num_attention_heads": sparsity}
        return fxprune.hf.prune_with_result(model, inputs, sparsity=sparsity, layer_indices=indices).model
    if variant == "fxprune unconstrained":
        return fxprune.prune(model, inputs, sparsity=sparsity, capture="export").graph_module
    return _torch_pruning(model, inputs, sparsity, keep_hidden=variant.endswith("hidden kept"))


def _torch_pruning(model: Any, inputs: tuple, sparsity: float, keep_hidden: bool) -> Any:
    """Torch-Pruning's LLM recipe on separate q/k/v projections (its examples/LLMs/prune_llm.py)."""
    import torch_pruning as tp
    config = model.config
    num_heads = {}
    for name, m in model.named_modules():
        if name.endswith("self_attn"):
            num_heads[m.q_proj] = config.num_attention_heads
            num_heads[m.k_proj] = config.num_key_value_heads
            num_heads[m.v_proj] = config.num_key_value_heads
    ignored = [model.lm_head] + ([model.model.embed_tokens] if keep_hidden else [])
    pruner = tp.pruner.MetaPruner(model, example_inputs=inputs[0],
                                  importance=tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean"),
                                  global_pruning=False, pruning_ratio=sparsity, ignored_layers=ignored,
                                  num_heads=num_heads, prune_num_heads=True, prune_head_dims=False,
                                  head_pruning_ratio=sparsity, round_to=4)
    for group in pruner.step(interactive=True):
        group.prune()
    _patch_config(model)  # by hand, as Torch-Pruning's example does
    return model


def _patch_config(model: Any) -> None:
    config = model.config
    config.hidden_size = model.lm_head.in_features
    for name, m in model.named_modules():
        if name.endswith("self_attn"):
            heads = m.q_proj.out_features // m.head_dim
            config.num_attention_heads = config.num_key_value_heads = heads
            m.num_key_value_groups = 1
        elif name.endswith("mlp"):
            config.intermediate_size = m.gate_proj.out_features


def worker(variant: str, sparsity: float) -> dict:
    import torch
    torch.set_num_threads(1)
    from quality_models import trained_llama
    from fxprune.measure import count_params, measure
    trained = trained_llama()
    model, inputs = trained.model, trained.example_inputs
    params_before = count_params(model)
    dense = trained.evaluate(model) if variant == VARIANTS[0] else None
    with measure() as m:
        pruned = _prune(variant, model, inputs, sparsity)
    return {"variant": variant, "sparsity": sparsity, "perplexity": trained.evaluate(pruned),
            "dense": dense, "params_before": params_before, "params": count_params(pruned),
            "wall_s": round(m.wall_s, 2), "peak_mb": round(m.peak_delta_mb or 0.0, 1)}


# --- the driver ------------------------------------------------------------------------------------------
def run() -> dict:
    rows = {}
    for sparsity in SPARSITIES:
        for variant in VARIANTS:
            row = run_worker(Path(__file__), [variant, str(sparsity)], timeout_s=1800, mem_gb=8)
            rows[f"{variant}@{sparsity}"] = row
            print(json.dumps(row), flush=True)
    return save_section(SECTION, environment(threads=1), rows)


def write_table(section: dict) -> str:
    rows, meta = section["rows"], section["meta"]
    dense = next((r.get("dense") for r in rows.values() if r.get("dense")), None)
    body = []
    for sparsity in SPARSITIES:
        for variant in VARIANTS:
            r = rows.get(f"{variant}@{sparsity}", {})
            kept = r["params"] / r["params_before"] if "params" in r else None
            body.append((f"{sparsity:.0%}", variant, r.get("perplexity", r.get("status")), kept,
                         r.get("wall_s"), r.get("peak_mb")))
    text = "\n".join([
        "# fxprune.hf on a trained LLaMA", "",
        f"`python benchmarks/bench_hf.py` — {meta.get('date', '?')}, git {meta.get('git', '?')}, torch "
        f"{meta.get('torch', '?')}, Torch-Pruning {meta.get('torch_pruning', '?')}, 1 thread, load average at "
        f"start {meta.get('loadavg_at_start', '?')} (other work ran beside it: times are indicative).", "",
        f"Dense perplexity: {dense:.3f}." if dense else "", "",
        table(("sparsity", "variant", "perplexity", "params kept", "prune s", "peak MB"), body), "",
        "`fxprune.hf` rows are `LlamaForCausalLM` models that `save_pretrained`/`from_pretrained` "
        "round-trip; `fxprune unconstrained` is an export-level graph (parts of heads pruned, widths per "
        "layer: no config holds it); Torch-Pruning's result needs its config patched by hand. A plain "
        "sparsity prunes the hidden size too (through every RMSNorm), in every variant; `hidden kept` rows "
        "keep it (fxprune.hf: `sparsity={'intermediate_size': s, 'num_attention_heads': s}`). Peak MB: RSS "
        "during the call over RSS before it.", ""])
    (HERE / "bench_hf.md").write_text(text, encoding="utf-8")
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", nargs=2, metavar=("VARIANT", "SPARSITY"))
    parser.add_argument("--table-only", action="store_true")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], float(args.worker[1]))))
        return
    section = load_results()[SECTION] if args.table_only else run()
    print(write_table(section))


if __name__ == "__main__":
    main()
